"""Forward hooks that steer a model for the duration of one call, and nothing longer.

    dictionary = SteeringDictionary(load_pack(path), domain="drugs")
    with SteeringHooks(model, dictionary, params, row_mask=rows):
        out = model(...)
    # here no SafeDIG hook remains, also after an exception or KeyboardInterrupt

The context manager owns its hook handles and removes them in `finally`; it keeps no global state. With
params that cannot change anything (mode off, strengths 0) or `active=False` it installs nothing, so the
model's output is bitwise that of a model which never saw SafeDIG.

A hook acts only on calls made by the thread that installed it (a sampler may call the same module from several
threads: ComfyUI's multi-GPU cond batcher), and records that it ran: `not_run` lists the positions whose module
was never called inside the block (a bypassed block, a replayed CUDA graph), so a caller can fail closed.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import PackError, SafeDIGError
from .pack import USE_DETECT, USE_STEER, DictionaryPack, decoder_key, encoder_key
from .positions import ModelPositions, resolve
from .steering_math import GateScope, PositionWeights, SteeringParams, steer_domains

ALL_DOMAINS = "(all domains)"  # the domain choice that steers with every domain of the pack at once


class SteeringDictionary:
    """A pack with the chosen domain's decoders, or with every domain's (`domain=ALL_DOMAINS`: a token is
    steered once, by the domain whose gate opens widest, steering_math.steer_domains), optionally
    restricted to a subset of its positions. domain None is the pack's source domain.

    Weights are cast to each (device, dtype) once and cached, so repeated sampling calls pay nothing.
    """

    def __init__(self, pack: DictionaryPack, domain: str | None = None, positions: list[str] | None = None):
        self.pack = pack
        self.requested = domain
        if domain == ALL_DOMAINS:
            self.domains = pack.domains
            self.domain = self.domains[0] if len(self.domains) == 1 else "all: " + ", ".join(self.domains)
        else:
            self.domain = domain or pack.source_domain
            pack.require_domain(self.domain)
            self.domains = [self.domain]
        unknown = [p for p in positions or [] if p not in pack.positions]
        if unknown:
            raise PackError(f"positions {unknown} are not routed in this pack",
                            f"pick from {pack.positions}", path=pack.path)
        self.positions = list(positions) if positions else pack.positions
        self._check_uses()
        self._cache: dict[tuple[str, str, torch.device, torch.dtype], PositionWeights] = {}
        self._lock = threading.Lock()

    def _check_uses(self) -> None:
        """Refuse a position choice that could not steer: nothing that detects, or nothing that edits."""
        infos = {p: self.pack.position_info(p) for p in self.positions}
        if not any(i.detects for i in infos.values()):
            raise PackError(f"positions {self.positions} only steer images another position detects",
                            f"add one of the pack's detecting positions {self.pack.positions_that(USE_DETECT)}",
                            path=self.pack.path)
        if not any(i.edits for i in infos.values()):
            raise PackError(f"positions {self.positions} only detect: nothing would be steered",
                            f"add one of the pack's steering positions {self.pack.positions_that(USE_STEER)}",
                            path=self.pack.path)

    @property
    def needs_image_scope(self) -> bool:
        """True when some position edits only what another detects: the token gate cannot steer it."""
        return any(not self.pack.position_info(p).detects for p in self.positions)

    def check_params(self, params: SteeringParams) -> None:
        """Fail closed on settings this dictionary cannot steer with (raised before any hook is installed)."""
        if self.needs_image_scope and params.scope != GateScope.IMAGE and not params.is_identity:
            steer_only = [p for p in self.positions if not self.pack.position_info(p).detects]
            raise SafeDIGError(f"this pack steers at {steer_only} the images its other positions detect, which "
                               "needs the image-scope gate; with the token gate nothing would be steered",
                               "set Steer's gate scope to image")

    def __repr__(self) -> str:
        return f"SteeringDictionary({self.pack.path!r}, domain={self.domain!r}, positions={self.positions})"

    def weights(self, position: str, device: torch.device, dtype: torch.dtype,
                domain: str | None = None) -> PositionWeights:
        """One domain's weights at a position (default: the only domain of a single-domain dictionary)."""
        if domain is None:
            if len(self.domains) != 1:
                raise ValueError("this dictionary steers several domains: use domain_weights()")
            domain = self.domains[0]
        key = (domain, position, device, dtype)
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        with self._lock:
            if key not in self._cache:
                self._cache[key] = self._build(domain, position, device, dtype)
            return self._cache[key]

    def domain_weights(self, position: str, device: torch.device, dtype: torch.dtype) -> list[PositionWeights]:
        return [self.weights(position, device, dtype, d) for d in self.domains]

    def thresholds(self, params: SteeringParams) -> dict[str, float]:
        """The threshold the Report compares scores with, per position: the domain's tau (scaled or
        overridden by params), or 1 for several domains, whose scores are reported as gate margins."""
        if len(self.domains) > 1:
            return {p: 1.0 for p in self.positions}
        return {p: params.threshold(self.pack.domain_features(self.domain, p).tau) for p in self.positions}

    def _build(self, domain: str, position: str, device: torch.device, dtype: torch.dtype) -> PositionWeights:
        info = self.pack.position_info(position)
        feats = self.pack.domain_features(domain, position)
        t = self.pack.tensors

        def cast(name: str) -> Tensor:
            return t[name].to(device=device, dtype=dtype)

        blend_map = self.pack.blend_map(domain, position)
        affine = self.pack.blend_affine(domain, position)
        anchor = torch.zeros(info.d_sae, dtype=dtype, device=device)
        if feats.anchor_ids:
            anchor[torch.tensor(feats.anchor_ids, device=device)] = torch.tensor(
                feats.anchor_values, dtype=dtype, device=device)
        return PositionWeights(
            scale=info.scale,
            k=info.k,
            W_enc=cast(encoder_key(position, "W_enc")),
            b_enc=cast(encoder_key(position, "b_enc")),
            b_pre=cast(encoder_key(position, "b_pre")),
            W_dec=cast(decoder_key(domain, position, "W_dec")),
            b_dec=cast(decoder_key(domain, position, "b_dec")),
            harmful_ids=torch.tensor(info.harmful_ids, dtype=torch.long, device=device),
            harmful_weights=torch.tensor(feats.harmful_weights, dtype=dtype, device=device),
            anchor=anchor,
            tau=feats.tau,
            blend_map=None if blend_map is None else blend_map.to(device=device, dtype=dtype),
            blend_affine=None if affine is None else affine.to(device=device, dtype=dtype),
            detects=info.detects,
            edits=info.edits,
        )


class _SteeringHook:
    """The forward hook at one position; identifiable so duplicates can be refused and counted."""

    def __init__(self, owner: object, position: str, session: SteeringHooks):
        self.owner = owner
        self.position = position
        self.session = session

    def __call__(self, module: nn.Module, args, output):
        s = self.session
        if threading.get_ident() != s.thread:
            return None  # another thread's call of this module: that thread's own hook steers it
        if not isinstance(output, Tensor) or not output.is_floating_point():
            return None  # not recorded as run: a caller that checks `not_run` refuses it
        weights = s.dictionary.domain_weights(self.position, output.device, output.dtype)
        scores: list[Tensor] | None = [] if s.on_scores is not None else None
        gates: list[Tensor] | None = [] if s.on_scores is not None else None
        if s.latch is None and s.params.scope == GateScope.IMAGE:
            s.latch = torch.zeros(output.shape[0], dtype=torch.bool, device=output.device)
        # only a latch opening after an editing position ran in this call needs a second pass
        before = s.latch.clone() if s.latch is not None and s.edited_before else None
        rows = s.row_mask(output.shape[0]) if callable(s.row_mask) else s.row_mask
        steered = steer_domains(output, weights, s.params, rows, scores_out=scores, latch=s.latch, gates_out=gates)
        if before is not None and s.latch is not None:
            # rows latched here that a position earlier in this call could have edited: see late_latched
            s.late_latched = (s.late_latched | (s.latch & ~before)) if s.late_latched is not None \
                else s.latch & ~before
        if s.on_scores is not None and scores and gates:
            s.on_scores(self.position, scores[0], gates[0])
        s.ran.add(self.position)
        s.edited_before |= weights[0].edits and not s.params.is_identity
        return None if steered is output else steered


def safedig_hooks(model: nn.Module) -> list[tuple[str, nn.Module, object]]:
    """Every SafeDIG hook currently installed anywhere in `model`: (module name, module, hook)."""
    return [
        (name, m, h)
        for name, m in model.named_modules()
        for h in m._forward_hooks.values()
        if isinstance(h, _SteeringHook)
    ]


class SteeringHooks:
    """Context manager: steer `model` at the dictionary's positions while inside the `with` block.

    row_mask: [batch] bool, rows to steer (None: all), or a function of a call's batch size giving them (a
    sampler whose calls batch their rows differently, e.g. ComfyUI's cond / uncond chunks). active=False
    installs nothing (e.g. outside the step range). on_scores(position, scores[batch, tokens], gate[batch,
    tokens]) receives the harmful scores (exact where the gate may open) and the gate weight each token was
    steered with, for reports.
    owner identifies the installer (e.g. one Steer node); installing the same owner twice on a module is
    refused, so an exception that skipped cleanup somewhere else can never double-steer.
    latch: [batch] bool, the rows already latched by an image-scope gate (updated in place); pass the same
    tensor to every call of one sampling run. None: latched rows are remembered for this context only.
    """

    def __init__(self, model: object, dictionary: SteeringDictionary, params: SteeringParams, *,
                 row_mask: Tensor | Callable[[int], Tensor] | None = None, active: bool = True, owner: object = None,
                 on_scores: Callable[[str, Tensor, Tensor], None] | None = None,
                 model_positions: ModelPositions | None = None, latch: Tensor | None = None):
        self.model = model
        self.dictionary = dictionary
        self.params = params
        self.row_mask = row_mask
        self.active = active
        self.owner = owner if owner is not None else dictionary
        self.on_scores = on_scores
        self._model_positions = model_positions
        self.latch = latch
        self.thread = threading.get_ident()
        self.ran: set[str] = set()  # positions whose hook ran inside the block
        self.edited_before = False  # an editing position already ran in this call
        # [batch] rows the image gate latched after an editing position had run in the same call (e.g. detected
        # at single.0.out after input.txt ran): SamplingSteering runs such a call again so they are steered
        # from this call on at every position. None: no such row.
        self.late_latched: Tensor | None = None
        self._hooked: list[str] = []
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._entered = False

    def __enter__(self) -> SteeringHooks:
        if self._entered:
            raise SafeDIGError("this SteeringHooks is already active", "use a new context for each call")
        self._entered = True
        self.ran, self._hooked = set(), []
        self.edited_before, self.late_latched = False, None
        if not self.active or (self.params.is_identity and self.on_scores is None):
            return self
        self.dictionary.check_params(self.params)
        positions = self._model_positions or resolve(self.model)
        self.dictionary.pack.check_compatible(positions, self.dictionary.positions)
        try:
            for pos in self.dictionary.positions:
                module = positions.modules[pos]
                if any(isinstance(h, _SteeringHook) and h.owner is self.owner and h.session.thread == self.thread
                       for h in module._forward_hooks.values()):
                    raise SafeDIGError(f"SafeDIG hooks of this owner are already installed at {pos}",
                                       "do not nest the same steering twice; use one Steer per dictionary")
                self._handles.append(module.register_forward_hook(_SteeringHook(self.owner, pos, self)))
                self._hooked.append(pos)
        except BaseException:
            self._remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._remove()
        self._entered = False

    def _remove(self) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()

    @property
    def installed(self) -> int:
        return len(self._handles)

    @property
    def not_run(self) -> list[str]:
        """Positions this context hooked whose hook never ran (also valid after the block)."""
        return [p for p in self._hooked if p not in self.ran]


class ActivationCapture:
    """Context manager: record the activation at each position during the calls inside the block.

    By default each call's output is appended (detached, on CPU) to `activations[position]`; pass
    on_activation(position, tensor) to stream them elsewhere instead (bounded memory for collection).
    Hooks are removed in `finally` like SteeringHooks; capture never changes the model's output.
    """

    def __init__(self, model: object, positions: list[str] | None = None,
                 on_activation: Callable[[str, Tensor], None] | None = None):
        self.model_positions = resolve(model)
        unknown = [p for p in positions or [] if p not in self.model_positions.modules]
        if unknown:
            raise SafeDIGError(f"positions {unknown} do not exist in {self.model_positions.describe()}",
                               "list valid ids with `python -m safedig_core positions`")
        self.positions = list(positions) if positions else self.model_positions.ids
        self.activations: dict[str, list[Tensor]] = {p: [] for p in self.positions}
        self.on_activation = on_activation or (lambda p, t: self.activations[p].append(t.detach().to("cpu", copy=True)))
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ActivationCapture:
        try:
            for pos in self.positions:
                module = self.model_positions.modules[pos]
                self._handles.append(module.register_forward_hook(
                    lambda _m, _a, out, pos=pos: self.on_activation(pos, out)))
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        handles, self._handles = self._handles, []
        for h in handles:
            h.remove()
