"""transformers' own model for a config, built on the meta device: which class, where its
decoder layers are, its text config, and the per-layer keyword arguments its forward passes
(masks and position embeddings differ between sliding and full attention layers)."""
from __future__ import annotations

import contextlib
import inspect
import logging
import warnings
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..errors import InputError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

log = logging.getLogger(__name__)

# Keyword arguments of a decoder-layer call that belong to generation, not to one forward.
_CACHE_KWARGS = ("past_key_values", "past_key_value", "cache", "use_cache", "output_attentions",
                 "cache_position", "output_router_logits")

# Families transformers does not know under their own model_type but builds from another's
# config: Kimi-K2 publishes DeepSeek-V3's architecture (DeepseekV3ForCausalLM, the same
# tensor names) as model_type "kimi_k2" with remote code.
ALIASES = {"kimi_k2": "deepseek_v3"}


def config_from_dict(raw: dict):
    """config.json as transformers reads it (aliases such as num_local_experts resolved)."""
    from transformers import AutoConfig

    params = {k: v for k, v in raw.items() if k not in ("model_type", "quantization_config",
                                                      "transformers_version")}
    model_type = raw.get("model_type")
    if not model_type:
        raise InputError("config.json has no model_type")
    model_type = ALIASES.get(model_type, model_type)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return AutoConfig.for_model(model_type, **params)
        except ValueError as e:
            raise InputError(f"unsupported architecture {model_type!r}: transformers "
                             f"does not know it ({str(e).splitlines()[0][:120]})") from None
        except Exception as e:  # noqa: BLE001 -- the config class rejected the values
            raise InputError(f"config.json of {model_type!r} does not build: "
                             f"{type(e).__name__}: {str(e).splitlines()[0][:160]}") from None


def text_config(cfg):
    try:
        return cfg.get_text_config(decoder=True)
    except (TypeError, ValueError):
        return cfg.get_text_config()


def model_class(cfg):
    """The generating model class for `cfg`: a causal LM, else an image-text-to-text model."""
    from transformers.models.auto import modeling_auto as auto

    model_type = cfg.model_type
    order = ("MODEL_FOR_CAUSAL_LM_MAPPING", "MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING")
    if getattr(cfg, "vision_config", None) is not None:  # a composite config: the VLM class
        order = order[::-1]
    for mapping in order:
        m = getattr(auto, mapping)
        try:
            return m[type(cfg)]
        except KeyError:
            continue
    if getattr(cfg, "is_encoder_decoder", False):
        raise InputError(f"unsupported architecture {model_type!r}: an encoder-decoder model "
                         f"(layerquant quantizes decoder-only language models)")
    raise InputError(f"unsupported architecture {model_type!r}: transformers has no causal-LM "
                     f"or image-text-to-text class for it")


def build_meta(cfg, dtype: torch.dtype | None = None) -> PreTrainedModel:
    """transformers' model for `cfg` on the meta device (nothing allocated)."""
    cls = model_class(cfg)
    if getattr(cfg, "is_encoder_decoder", False):
        raise InputError(f"unsupported architecture {cfg.model_type!r}: an encoder-decoder "
                         f"model (layerquant quantizes decoder-only language models)")
    last = None
    for impl in ("sdpa", "eager"):
        cfg._attn_implementation = impl
        for sub in ("text_config", "vision_config"):
            c = getattr(cfg, sub, None)
            if c is not None and hasattr(c, "_attn_implementation"):
                c._attn_implementation = impl
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                kwargs = {"dtype": dtype} if dtype is not None else {}
                model = cls._from_config(cfg, **kwargs) if hasattr(cls, "_from_config") \
                    else cls(cfg)
                break
            except ValueError as e:  # this attention implementation is not offered
                last = e
                continue
            except Exception as e:  # noqa: BLE001
                raise InputError(f"unsupported architecture {cfg.model_type!r}: transformers' "
                                 f"{cls.__name__} does not build from this config "
                                 f"({type(e).__name__}: "
                                 f"{str(e).splitlines()[0][:160]})") from None
    else:
        raise InputError(f"unsupported architecture {cfg.model_type!r}: no attention "
                         f"implementation builds ({last})")
    model.eval()
    model.requires_grad_(False)
    return model


def decoder_layers(model: PreTrainedModel) -> tuple[str, nn.ModuleList]:
    """(path, ModuleList) of the text decoder's layers: the `layers` list of the module
    get_decoder() returns, or the longest ModuleList of decoder layers in the text model."""
    cfg = text_config(model.config)
    n = int(getattr(cfg, "num_hidden_layers", 0) or 0)
    root = model.get_decoder() if hasattr(model, "get_decoder") else None
    root_path = next((p for p, m in model.named_modules() if m is root), None) if root is not None \
        else None
    found = []
    for path, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) == n and n > 0:
            found.append(path)
    if root_path is not None:
        inside = [p for p in found if root_path == "" or p.startswith(root_path + ".")]
        found = inside or found
    if not found:
        raise InputError(f"unsupported architecture {model.config.model_type!r}: no list of "
                         f"{n} decoder layers in {type(model).__name__}")
    # transformers' own name first ("layers"; GPT-J and Falcon say "h")
    path = min(found, key=lambda p: (p.rsplit(".", 1)[-1] not in ("layers", "h"), len(p)))
    layers = model.get_submodule(path)
    assert isinstance(layers, nn.ModuleList)  # `found` holds ModuleLists only
    return path, layers


def text_module_paths(model: PreTrainedModel, layers_path: str) -> tuple[str, ...]:
    """Paths of the modules the text forward uses: the decoder holding the layers and the
    output embeddings. Everything else (a vision tower, a projector) is kept as it is."""
    decoder = layers_path.rpartition(".")[0]
    out = [decoder]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None:
        out += [p for p, m in model.named_modules() if m is head]
    return tuple(out)


def layer_output(out):
    """Decoder layers return a tensor (transformers 5) or a tuple (4.x)."""
    return out[0] if isinstance(out, (tuple, list)) else out


def materialise_buffers(model: nn.Module, device="cpu", skip: str | None = None) -> None:
    """Non-persistent buffers (rotary tables, embedding scales) are computed at init, not
    stored: make them real on `device` with transformers' own initialiser of their module.
    Modules under `skip` (the decoder layers) are left alone."""
    from transformers.modeling_utils import PreTrainedModel

    owners: dict[str, PreTrainedModel] = {}
    for path, mod in model.named_modules():
        if isinstance(mod, PreTrainedModel):
            owners[path] = mod
    for path, mod in model.named_modules():
        if skip and (path == skip or path.startswith(skip + ".")):
            continue
        names = [n for n in getattr(mod, "_non_persistent_buffers_set", ()) if
                 mod._buffers.get(n) is not None and mod._buffers[n].is_meta]
        if not names:
            continue
        for n in names:
            mod._buffers[n] = torch.empty_like(mod._buffers[n], device=device)
        owner = max((p for p in owners if path == p or p == "" or path.startswith(p + ".")),
                    key=len)
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            _init_buffers(owners[owner], mod)


def _init_buffers(owner, mod: nn.Module) -> None:
    """owner._init_weights(mod) for its buffers only: its parameters (meta or loaded) keep
    their values (initialising a real embedding would overwrite it)."""
    saved = {n: p for n, p in mod._parameters.items()}
    for n, p in saved.items():
        if p is not None:
            mod._parameters[n] = nn.Parameter(torch.empty_like(p, device="meta"),
                                              requires_grad=False)
    try:
        guard: contextlib.AbstractContextManager[Any]
        try:
            from transformers import initialization as init
            guard = init.guard_torch_init_functions()
        except (ImportError, AttributeError):
            guard = contextlib.nullcontext()
        with guard:
            owner._init_weights(mod)
    finally:
        mod._parameters.update(saved)


class _Stop(Exception):
    pass


class _LayerCatcher(nn.Module):
    """Stands in for decoder layer `index`: records its call and returns its input."""

    def __init__(self, inner: nn.Module, index: int, record: dict, last: bool, as_tuple: bool):
        super().__init__()
        self.inner = inner
        self._lq = (index, record, last, as_tuple)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)

    def forward(self, hidden_states, *args, **kwargs):
        index, record, last, as_tuple = self._lq
        if args:  # positional arguments after the hidden states: name them
            inner = self._modules["inner"]
            assert inner is not None
            sig = inspect.signature(inner.forward)
            bound = sig.bind_partial(hidden_states, *args)
            kwargs = {**{k: v for k, v in bound.arguments.items()
                         if k != next(iter(sig.parameters))}, **kwargs}
        record[index] = (hidden_states, {k: v for k, v in kwargs.items()
                                         if k not in _CACHE_KWARGS})
        if last:
            raise _Stop
        return (hidden_states,) if as_tuple else hidden_states


class _ZeroEmbedding(nn.Module):
    def __init__(self, width: int, dtype, like: nn.Module | None = None):
        super().__init__()
        self.width, self.dtype = width, dtype
        # some models read their embedding's weight (its dtype, its vocabulary size)
        self.weight = getattr(like, "weight", None)

    def forward(self, ids):
        return torch.zeros(*ids.shape, self.width, dtype=self.dtype, device=ids.device)


@torch.no_grad()
def capture_layer_calls(model: PreTrainedModel, layers: nn.ModuleList, input_ids: torch.Tensor,
                        zero_embeddings: bool = False, first_only: bool = False):
    """Run the model's own forward on `input_ids` with every decoder layer replaced by a
    recorder: (hidden states entering layer 0, [kwargs of layer i]). Nothing of the layers is
    computed; `zero_embeddings` stands in zeros for a token embedding that is not loaded.
    `first_only`: stop at layer 0 (its kwargs alone come back)."""
    n = 1 if first_only else len(layers)
    embed = model.get_input_embeddings()
    if zero_embeddings:
        width = int(text_config(model.config).hidden_size)
        model.set_input_embeddings(_ZeroEmbedding(width, torch.float32, embed))
    error = None
    try:
        for as_tuple in (False, True):
            record: dict[int, tuple] = {}
            originals = list(layers)
            for i in range(n):
                layers[i] = _LayerCatcher(originals[i], i, record, i == n - 1, as_tuple)
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    model(input_ids=input_ids, use_cache=False)
            except _Stop:
                error = None
            except Exception as e:  # noqa: BLE001 -- retried with tuple outputs, then reported
                error = e
            finally:
                for i in range(n):
                    layers[i] = originals[i]
            if error is None and len(record) == n:
                break
    finally:
        if zero_embeddings:
            model.set_input_embeddings(embed)
    if error is not None and "values to unpack (expected 2" in str(error):
        raise InputError(f"unsupported architecture {model.config.model_type!r}: its decoder "
                         f"layers hand a second value to the next layer besides the hidden "
                         f"states (a separate residual, or attention indices one layer computes "
                         f"for the next); layerquant runs each layer on its hidden states alone")
    skipped = [i for i in range(max(record, default=-1) + 1) if i not in record]
    if error is None and 0 < len(record) < n:
        skipped = [i for i in range(n) if i not in record]
    if skipped:
        raise InputError(f"unsupported architecture {model.config.model_type!r}: the model's "
                         f"forward skips decoder layers {skipped[:4]} on text alone (layers "
                         f"that need an image, such as cross-attention layers); layerquant "
                         f"calibrates every layer with text")
    if error is not None or len(record) != n:
        raise InputError(f"unsupported architecture {model.config.model_type!r}: the model's "
                         f"forward did not reach its decoder layers ({type(error).__name__ if error else 'no call'}: "
                         f"{str(error).splitlines()[0][:160] if error else ''})")
    hidden = record[0][0]
    return hidden, [record[i][1] for i in range(n)]
