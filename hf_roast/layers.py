"""Drop-in layers whose weights are read from the shared array z instead of being owned.

``RoastStore`` owns z: the single registered ``nn.Parameter``. Layers hold a plain (unregistered)
reference to the store module and read ``store.z`` at every call, never a reference to the tensor,
so that loaders that replace Parameter objects (transformers does) cannot leave a layer reading a
stale z, and state dicts / safetensors hold z exactly once.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .backends.dispatch import layer_geometry, materialize_weight, roast_embedding, roast_linear
from .balance import BalanceModuleGradient, balance_state
from .mapping import LayerMapping, MappingPlan, ModuleSpec, gradient_scaler
from .quant import QuantizedZ, check_bits, check_group
from .vocab import Z_INT_BITS


class RoastStore(nn.Module):
    """Holds z, the mapping plan and the gradient scaler shared by every compressed layer.

    z is stored in one of three ways (``RoastConfig.z_bits`` / ``z_qat``):

    * floats (z_bits 32 or 16): the parameter ``z``;
    * quantisation-aware training (z_bits 8 or 4, ``z_qat``): the fp32 master parameter ``z``, read through
      its integer grid in every forward pass (:attr:`fake_quant`);
    * packed (z_bits 8 or 4): no parameter (``z`` is None) but the buffers ``z_codes`` and ``z_scales``
      (:class:`~hf_roast.quant.QuantizedZ`), read and dequantised tile by tile.

    Layers read :meth:`read_z`, never an attribute.
    """

    def __init__(
        self,
        plan: MappingPlan,
        scaler: str = "v5",
        dtype: torch.dtype = torch.float32,
        device=None,
        z_bits: int | None = None,
        z_group_size: int = 128,
        z_qat: bool = False,
        module_balance: bool = False,
    ):
        super().__init__()
        self.plan = plan
        self.scaler = scaler
        self.module_balance = module_balance
        self._module_index = {spec.name: i for i, spec in enumerate(plan.modules)}
        self._module_views: dict[str, torch.Tensor] | None = None  # see hf_roast.balance.module_gradients
        self.backend = "auto"
        self.z_bits = z_bits or torch.finfo(dtype).bits
        self.z_group_size = z_group_size
        self.z_qat = z_qat
        if self.z_bits in Z_INT_BITS:
            check_group(plan.num_slots, z_group_size, plan.tile_numel)
        if self.packed:
            self.register_parameter("z", None)
            n = plan.num_slots
            codes = torch.zeros(
                QuantizedZ.codes_numel(n, self.z_bits), dtype=QuantizedZ.codes_dtype(self.z_bits)
            )
            self.register_buffer("z_codes", codes.to(device))
            self.register_buffer(
                "z_scales", torch.zeros(n // z_group_size, dtype=torch.float32, device=device)
            )
        else:
            self.z = nn.Parameter(torch.zeros(plan.num_slots, dtype=dtype, device=device))
        self.register_buffer("scaler_inv", torch.empty(0), persistent=False)
        # module_balance: running mean square of each module's dz and its step count (training state, not stored)
        self.register_buffer("grad_balance", torch.empty(0), persistent=False)
        self._layers: list[nn.Module] = []

    @classmethod
    def from_config(cls, plan: MappingPlan, config, device=None, fitting: bool = False) -> RoastStore:
        """The store a :class:`~hf_roast.config.RoastConfig` asks for, with its backend.

        ``fitting``: z is about to be initialised from dense weights, so it stays float (or the QAT master)
        even when the config packs it; the caller packs it after the fit. Otherwise (a checkpoint's skeleton)
        the store takes the stored layout at once.
        """
        store = cls(
            plan,
            scaler=config.scaler,
            dtype=config.torch_dtype,
            device=device,
            z_bits=config.z_bits if config.z_qat or not fitting else None,
            z_group_size=config.z_group_size,
            z_qat=config.z_qat,
            module_balance=config.module_balance,
        )
        store.backend = config.backend
        return store

    @property
    def packed(self) -> bool:
        """Whether z is stored as packed integer codes and scales (inference; no trainable z)."""
        return self.z_bits in Z_INT_BITS and not self.z_qat

    @property
    def fake_quant(self) -> tuple[int, int] | None:
        """(bits, group size) while training against an integer grid (QAT), else None."""
        return (self.z_bits, self.z_group_size) if self.z_qat else None

    @property
    def device(self) -> torch.device:
        return self.z_codes.device if self.packed else self.z.device

    def read_z(self) -> torch.Tensor | QuantizedZ:
        """What the execution paths read: the parameter z (float or QAT master), or the packed codes."""
        if self.packed:
            return QuantizedZ(self.z_codes, self.z_scales, self.z_bits, self.z_group_size)
        return self.z

    def balanced_z(self, z: torch.Tensor | QuantizedZ, name: str) -> torch.Tensor | QuantizedZ:
        """z as module ``name`` reads it while training with ``module_balance`` (an identity whose backward
        balances that module's dz, see :mod:`hf_roast.balance`); z itself otherwise."""
        if not (isinstance(z, torch.Tensor) and z.requires_grad and torch.is_grad_enabled()):
            return z
        if self._module_views is not None:  # each module's own dz is being read (module_gradients)
            return self._module_views.setdefault(name, z.view_as(z))
        if not self.module_balance:
            return z
        state = self.grad_balance
        if state.numel() == 0 or state.device != z.device:
            state = balance_state(len(self.plan.modules), z.device)
            self.grad_balance = state
        return BalanceModuleGradient.apply(z, state, self._module_index[name])

    def z_tensors(self) -> dict[str, torch.Tensor]:
        """The stored tensors of z by state-dict name (relative to the store)."""
        if self.packed:
            return {"z_codes": self.z_codes, "z_scales": self.z_scales}
        return {"z": self.z}

    @property
    def z_nbytes(self) -> int:
        """Bytes z takes in memory and on disk (codes and scales when packed)."""
        return sum(t.numel() * t.element_size() for t in self.z_tensors().values())

    @torch.no_grad()
    def quantize_(self, bits: int, group_size: int = 128) -> None:
        """Post-training quantisation: replace the float (or QAT master) z by packed ``bits``-bit codes and
        one fp32 scale per ``group_size`` values. z is then no longer a parameter (inference)."""
        bits = check_bits(bits)
        if self.packed:
            raise ValueError(
                f"z is already packed to {self.z_bits} bits: quantise the float model (or reload it) instead."
            )
        if self.z.device.type == "meta":
            raise ValueError("z is on the meta device (not loaded): load the checkpoint before quantising.")
        q = QuantizedZ.quantize(self.z.detach(), bits, group_size, self.plan.tile_numel)
        del self.z
        self.register_parameter("z", None)
        self.register_buffer("z_codes", q.codes)
        self.register_buffer("z_scales", q.scales)
        self.z_bits, self.z_group_size, self.z_qat = bits, group_size, False
        self.rebuild()

    def rebuild(self) -> None:
        """(Re)build derived buffers: the scaler and every layer's tables. Call after weights load."""
        device = self.device
        if device.type == "meta":
            return
        inv = gradient_scaler(self.plan, self.scaler, device=device)
        self.scaler_inv = inv if inv is not None else torch.empty(0, device=device)
        for layer in self._layers:
            layer.rebuild_tables()

    def extra_repr(self) -> str:
        p = self.plan
        return (
            f"num_slots={p.num_slots}, mapper={p.mapper!r}, tile={p.tile}, sign={p.sign!r}, scaler={self.scaler!r}, "
            f"z_bits={self.z_bits}"
            + (" (qat)" if self.z_qat else "")
            + (", module_balance" if self.module_balance else "")
        )


class RoastLayer(nn.Module):
    """Base of every layer that reads its weight from z: the store reference, the spec, the small tables.

    A layer declares what it owns, and everything that walks layers (the compression report, the
    quantizer's load check, merge and save) reads that declaration instead of guessing by name:

    * :attr:`owned_tensor_names`: the dense tensors it owns and a checkpoint stores (parameters or
      persistent buffers; an entry may be None on an instance, e.g. a linear layer without bias).

    Everything else a layer holds (the tile tables) is derived from the plan and never stored.
    """

    owned_tensor_names: tuple[str, ...] = ()
    spec: ModuleSpec

    def owned_tensors(self) -> dict[str, torch.Tensor]:
        """The owned tensors that exist on this instance, by name (see :attr:`owned_tensor_names`)."""
        return {n: t for n in self.owned_tensor_names if (t := getattr(self, n, None)) is not None}

    def _attach(self, store: RoastStore, spec: ModuleSpec, dtype: torch.dtype, device) -> None:
        object.__setattr__(self, "_roast_store", store)  # deliberately not registered as a submodule
        self.spec = spec
        store._layers.append(self)
        n_tiles = spec.n_tiles(store.plan.tile)
        self.register_buffer(
            "tile_slot", torch.zeros(n_tiles, dtype=torch.int64, device=device), persistent=False
        )
        self.register_buffer(
            "tile_scale", torch.ones(n_tiles, dtype=torch.float32, device=device), persistent=False
        )
        # An empty buffer whose dtype/device follow .to(): the compute dtype reported by `weight`.
        self.register_buffer("_dtype_probe", torch.empty(0, dtype=dtype, device=device), persistent=False)
        # the ops' ints for this layer, once: plan and spec never change for a layer's lifetime
        self._geometry = layer_geometry(store.plan, spec)

    @property
    def roast_store(self) -> RoastStore:
        return self._roast_store

    def rebuild_tables(self) -> None:
        plan = self._roast_store.plan
        device = self._roast_store.device
        if plan.is_tiled:
            self.tile_slot = plan.tile_slots(self.spec, device)
        self.tile_scale = plan.tile_scales(self.spec, device)
        if self._dtype_probe.device != device:
            self._dtype_probe = self._dtype_probe.to(device)

    def layer_mapping(self) -> LayerMapping:
        """This layer's :class:`LayerMapping`, rebuilt only when a table it holds was replaced.

        Decode calls every layer once per token, so the mapping is cached: the check is a few identity
        comparisons, and a stale mapping is impossible because any replaced table (``.to()``,
        :meth:`rebuild_tables`, a new scaler, QAT switched on or off) changes the key. While
        ``torch.compile`` traces, the mapping is built afresh from the live tables instead: a compiled graph
        reads the tables as inputs (their own guards keep it right), and every identity check traced here
        would become a guard that dynamo evaluates before each call.
        """
        return _layer_mapping(self)

    @property
    def weight(self) -> torch.Tensor:
        """A read-only stand-in with the dense weight's shape, dtype and device, filled with NaN.

        Some HF code reads ``module.weight.dtype`` / ``.device``; the real values live in z. Use
        :meth:`materialize_weight` for them.
        """
        probe = self._dtype_probe
        stand_in = torch.full((), float("nan"), dtype=probe.dtype, device=probe.device).expand(
            self._weight_shape()
        )
        # transformers' init functions skip flagged tensors: a parent's _init_weights (T5Attention writes
        # module.q.weight) must not write into this stand-in while a checkpoint loads.
        stand_in._is_hf_initialized = True
        return stand_in

    @torch.no_grad()
    def materialize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The dense weight this layer computes with, as a fresh tensor in the HF layout of the original."""
        z = _ready_z(self)
        dtype = dtype or self._dtype_probe.dtype
        w = materialize_weight(
            z, self.layer_mapping(), dtype, self._roast_store.backend, scratch=False
        ).clone()
        return w.t().contiguous() if self.spec.kind == "conv1d" else w


# The helpers of a layer's forward are module-level functions, not methods: for every method a compiled graph
# traced, dynamo checks before each call, layer by layer, that no instance attribute shadows it, while a
# global function is checked once per graph.
def _layer_mapping(layer: RoastLayer) -> LayerMapping:
    """:meth:`RoastLayer.layer_mapping`."""
    store = layer._roast_store
    buffers = layer._buffers
    if torch.compiler.is_compiling():
        return _new_mapping(
            layer, store, buffers["tile_slot"], buffers["tile_scale"], store._buffers["scaler_inv"]
        )
    key = (
        store.plan, layer.spec, buffers["tile_slot"], buffers["tile_scale"], store._buffers["scaler_inv"],
        store.fake_quant,
    )  # fmt: skip
    cached = layer.__dict__.get("_layer_mapping_cache")
    if cached is not None and all(a is b for a, b in zip(cached[0][:5], key)) and cached[0][5] == key[5]:
        return cached[1]
    mapping = _new_mapping(layer, store, key[2], key[3], key[4])
    layer.__dict__["_layer_mapping_cache"] = (key, mapping)
    return mapping


def _new_mapping(
    layer: RoastLayer,
    store: RoastStore,
    tile_slot: torch.Tensor,
    tile_scale: torch.Tensor,
    scaler_inv: torch.Tensor,
) -> LayerMapping:
    plan = store.plan
    return LayerMapping(
        plan, layer.spec, tile_slot if plan.is_tiled else None, tile_scale,
        scaler_inv if scaler_inv.numel() else None, store.fake_quant, (layer.spec, list(layer._geometry)),
    )  # fmt: skip


def _ready_z(layer: RoastLayer) -> torch.Tensor | QuantizedZ:
    """The store's z, or a clear error when it is not loaded or not beside the layer's tables."""
    z = layer._roast_store.read_z()
    if z.device.type == "meta":
        raise RuntimeError(
            f"{layer.spec.name}: the shared ROAST array z is still on the meta device; the checkpoint did "
            "not load it. Load the model with hf_roast (RoastModel.from_pretrained or an Auto class after "
            "`import hf_roast`)."
        )
    tables = layer._buffers["tile_scale"].device
    if tables != z.device:
        raise RuntimeError(
            f"{layer.spec.name}: layer tables are on {tables} but z is on {z.device}; move the "
            "whole model with model.to(device) rather than single submodules."
        )
    return z


def _check_input(layer: RoastLayer, x: torch.Tensor, z: torch.Tensor | QuantizedZ) -> None:
    """Clear errors for inputs the ROAST ops would otherwise turn into a cryptic failure."""
    if x.device != z.device and x.device.type != "meta":
        raise ValueError(
            f"{layer.spec.name}: the input is on {x.device} but the model's shared array z is on {z.device}; "
            f"move the inputs (or the model, with model.to(device)) to one device."
        )


class RoastLinear(RoastLayer):
    """Replaces ``nn.Linear`` (and GPT-2's ``Conv1D``): ``y = x W^T + b`` with W read from z. Bias stays dense."""

    owned_tensor_names = ("bias",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        store: RoastStore,
        spec: ModuleSpec,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device)) if bias else None
        self._attach(store, spec, dtype, device)

    def _weight_shape(self) -> tuple[int, int]:
        if self.spec.kind == "conv1d":
            return (self.in_features, self.out_features)
        return (self.out_features, self.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = _ready_z(self)
        _check_input(self, x, z)
        if not x.is_floating_point():
            raise TypeError(
                f"{self.spec.name}: the input has dtype {x.dtype}; a linear layer takes floating-point "
                "activations (float32, bfloat16 or float16)."
            )
        if x.shape[-1] != self.in_features:
            raise ValueError(
                f"{self.spec.name}: the input's last dimension is {x.shape[-1]}, but this layer takes "
                f"in_features={self.in_features}; check the input's shape."
            )
        # not self.bias: Module.__getattr__ costs a microsecond per call
        bias = self._parameters.get("bias")
        store = self._roast_store
        if store.module_balance or store._module_views is not None:
            z = store.balanced_z(z, self.spec.name)
        # SliceOut (hf_roast.sliceout) attaches a site to the layers of a block; eval mode never slices
        site = self.__dict__.get("_sliceout") if self.training else None
        if site is not None:
            y = site.linear(x, z, bias, _layer_mapping(self), store.backend)
            if y is not None:
                return y
        return roast_linear(x, z, bias, _layer_mapping(self), store.backend)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, roast={self.spec.name!r}"


class RoastEmbedding(RoastLayer):
    """Replaces ``nn.Embedding``: gathers only the looked-up rows from z.

    ``padding_idx`` is honoured exactly: the padding row is kept densely (``dim`` values) and receives
    no gradient, as in ``nn.Embedding``.
    """

    owned_tensor_names = ("padding_row",)

    def __init__(
        self,
        num_embeddings: int,
        embedding_dim: int,
        store: RoastStore,
        spec: ModuleSpec,
        padding_idx: int | None = None,
        dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        self.num_embeddings = num_embeddings
        self.embedding_dim = embedding_dim
        if padding_idx is not None and padding_idx < 0:
            padding_idx += num_embeddings
        self.padding_idx = padding_idx
        if padding_idx is not None:
            self.register_buffer("padding_row", torch.zeros(embedding_dim, dtype=dtype, device=device))
        else:
            self.padding_row = None
        self._attach(store, spec, dtype, device)

    def _weight_shape(self) -> tuple[int, int]:
        return (self.num_embeddings, self.embedding_dim)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        z = _ready_z(self)
        _check_input(self, input_ids, z)
        if input_ids.is_floating_point() or input_ids.is_complex() or input_ids.dtype == torch.bool:
            raise TypeError(f"{self.spec.name}: token ids must be an integer tensor, got {input_ids.dtype}.")
        # in-graph (no host sync, no graph break): ids outside the table would read other rows of z
        torch._assert_async(
            ((input_ids >= 0) & (input_ids < self.num_embeddings)).all(),
            f"{self.spec.name}: token ids must lie in [0, {self.num_embeddings}) (the embedding's size)",
        )
        store = self._roast_store
        if store.module_balance or store._module_views is not None:
            z = store.balanced_z(z, self.spec.name)
        out = roast_embedding(input_ids, z, _layer_mapping(self), self._dtype_probe.dtype, store.backend)
        if self.padding_idx is not None:
            pad = (input_ids == self.padding_idx).unsqueeze(-1)
            out = torch.where(pad, self.padding_row.to(out.dtype), out)
        return out

    @torch.no_grad()
    def materialize_weight(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        w = super().materialize_weight(dtype)
        if self.padding_idx is not None:
            w[self.padding_idx] = self.padding_row.to(w.dtype)
        return w

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, padding_idx={self.padding_idx}, roast={self.spec.name!r}"


def roast_layers(model: nn.Module) -> list[tuple[str, RoastLayer]]:
    """(name, layer) of every compressed layer of ``model``, in ``named_modules`` order."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, RoastLayer)]


def default_init_std(module: nn.Module) -> float:
    """A module's own init scale when its weights are not materialised (kaiming-uniform's std)."""
    fan_in = module.weight.shape[-1] if hasattr(module, "weight") else 1
    return 1.0 / math.sqrt(3.0 * max(1, fan_in))
