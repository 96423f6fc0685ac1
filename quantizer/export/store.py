"""Where finished layers are kept until the export is published.

`DirectStore` (the default): the export's final shard files, in `<job>/final/`, are the
per-layer durable store. Their layout is planned before the first layer (layout.py): each
shard is created with its final header at its final size, a finished layer's tensors are
written at their offsets and fsynced, then its record goes to `<job>/layers/quantize-NNNNN.json`
and the layer is committed in state.json as before. Resume reads finished layers back from the
shards; publishing is a rename. The job directory never holds a second copy of the model and
nothing is read back and rewritten at the end.

`LayerFileStore` (jobs started by an older layerquant, `LAYERQUANT_DIRECT_SHARDS=0`, or a
safetensors whose header convention differs from layout.py's): one safetensors file per layer
in `<job>/layers/`, assembled into shards at the end (the writer of earlier versions).

Both produce byte-identical exports (tests/test_direct_shards.py)."""
from __future__ import annotations

import json
import logging
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import InputError, QuantizerError
from ..kernels.packing import QuantizedWeight
from ..measurements.atomic import (atomic_write_json, fsync_dir, read_json, write_at)
from ..measurements.fingerprint import fingerprint_digest
from ..stream.skeleton import decoder_layers
from .layout import TORCH_DTYPES, ExportLayout, TensorSpec, convention_holds
from .writer import ShardWriter

log = logging.getLogger(__name__)

STAGE = "quantize"
FINAL_DIR = "final"  # <job>/final: the export being written (published by a rename)
LAYERS_DIR = "layers"
LAYOUT_FILE = "layout.json"
HEAD_RECORD = "head.json"


def _tensor_bytes(t: torch.Tensor):
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


class DirectStore:
    def __init__(self, job_path: Path, layout: ExportLayout, job_digest: str):
        self.job_path = Path(job_path)
        self.final = self.job_path / FINAL_DIR
        self.layers_dir = self.job_path / LAYERS_DIR
        self.layout = layout
        self.job_digest = job_digest

    # ---- opening -------------------------------------------------------------------------
    @staticmethod
    def present(job_path: Path) -> bool:
        return (Path(job_path) / LAYERS_DIR / LAYOUT_FILE).is_file()

    @classmethod
    def open_existing(cls, job_path: Path, job_digest: str) -> "DirectStore":
        """The store a job created, from its layout.json (export stage, follower ranks)."""
        path = Path(job_path) / LAYERS_DIR / LAYOUT_FILE
        doc = read_json(path, "export layout")
        try:
            layout = ExportLayout.from_json(doc)
            if doc.get("job") != job_digest:
                raise ValueError("written by another job")
        except (ValueError, KeyError, TypeError) as e:
            raise InputError(f"export layout {path} is damaged ({e}); pass --overwrite to "
                             f"start over") from None
        store = cls(job_path, layout, job_digest)
        store.check_files()
        return store

    def create(self) -> None:
        """Fresh shard files (final header, final size, data not yet written), then the
        layout record that makes them the job's."""
        if self.final.exists():  # an attempt killed before its layout record: not ours yet
            shutil.rmtree(self.final)
        self.final.mkdir(parents=True)
        for shard in self.layout.shards:
            fd = os.open(self.final / shard.file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                write_at(fd, shard.header, 0)
                os.ftruncate(fd, shard.size)
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(self.final)
        atomic_write_json(self.layers_dir / LAYOUT_FILE,
                          {"job": self.job_digest, **self.layout.to_json()})

    def attach(self) -> None:
        """Resume: the job's recorded layout must be the one planned now, its files intact."""
        path = self.layers_dir / LAYOUT_FILE
        doc = read_json(path, "export layout")
        if doc.get("job") != self.job_digest:
            raise InputError(f"export layout {path} belongs to another job; pass --overwrite")
        if doc.get("digest") != self.layout.digest():
            before = doc.get("max_shard_bytes")
            raise InputError(
                f"the export of this job was laid out differently (max shard size {before} "
                f"bytes, now {self.layout.max_shard_bytes}; or another layerquant version): "
                f"resume with --max-shard-size {before}B, or pass --overwrite to start over")
        self.check_files()

    def check_files(self) -> None:
        for shard in self.layout.shards:
            p = self.final / shard.file
            if not p.is_file() or p.stat().st_size != shard.size:
                raise InputError(f"export shard {p} is missing or has the wrong size; the job "
                                 f"directory is damaged: pass --overwrite to start over")
            with open(p, "rb") as f:
                if f.read(len(shard.header)) != shard.header:
                    raise InputError(f"export shard {p} has another header than its layout; "
                                     f"the job directory is damaged: pass --overwrite")

    # ---- tensors -------------------------------------------------------------------------
    def _write(self, tensors: dict[str, torch.Tensor]) -> None:
        by_shard: dict[int, list[str]] = {}
        for name in tensors:
            by_shard.setdefault(self.layout.where[name], []).append(name)
        for k, names in sorted(by_shard.items()):
            shard = self.layout.shards[k]
            fd = os.open(self.final / shard.file, os.O_WRONLY)
            try:
                for name in names:
                    begin, end = shard.offsets[name]
                    if end > begin:
                        write_at(fd, _tensor_bytes(tensors[name]), shard.data_start + begin)
                os.fsync(fd)
            finally:
                os.close(fd)

    def _read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        by_shard: dict[int, list[str]] = {}
        for name in names:
            by_shard.setdefault(self.layout.where[name], []).append(name)
        for k, group in sorted(by_shard.items()):
            path = self.final / self.layout.shards[k].file
            try:
                with safe_open(str(path), framework="pt", device="cpu") as f:
                    for name in group:
                        out[name] = f.get_tensor(name)
            except Exception as e:  # safetensors raises its own error types
                raise InputError(f"export shard {path} cannot be read ({e}); pass "
                                 f"--overwrite to start over") from None
        return out

    def _check_specs(self, index: int, tensors: dict[str, torch.Tensor]) -> None:
        planned = {s.name: s for s in self.layout.layers[index]}
        got = {k: TensorSpec.of(k, v) for k, v in tensors.items()}
        if got != planned:
            diff = sorted(set(got.items()) ^ set(planned.items()), key=lambda kv: kv[0])[:4]
            raise QuantizerError(
                f"internal: layer {index}'s export tensors differ from the planned layout "
                f"({diff}); set LAYERQUANT_DIRECT_SHARDS=0 and rerun with --overwrite")

    def save_layer(self, index: int, tensors: dict[str, torch.Tensor], meta: dict) -> None:
        """Durable once this returns; finished once the job commits it."""
        self._check_specs(index, tensors)
        self._write(tensors)
        atomic_write_json(self._record_path(index),
                          {"job": self.job_digest, "layout": self.layout.digest(),
                           "stage": STAGE, "index": index, "meta": meta})

    def load_layer(self, index: int) -> dict[str, torch.Tensor]:
        self.layer_record(index)
        return self._read([s.name for s in self.layout.layers[index]])

    def _record_path(self, index: int) -> Path:
        return self.layers_dir / f"{STAGE}-{index:05d}.json"

    def layer_record(self, index: int) -> dict:
        p = self._record_path(index)
        doc = read_json(p, "layer record")
        if not (isinstance(doc, dict) and doc.get("job") == self.job_digest
                and doc.get("index") == index and doc.get("layout") == self.layout.digest()):
            raise InputError(f"layer record {p} does not belong to this job; the job "
                             f"directory is damaged: pass --overwrite")
        return doc["meta"]

    # ---- the non-layer tensors and the end -----------------------------------------------
    def head_written(self) -> bool:
        p = self.layers_dir / HEAD_RECORD
        try:
            doc = json.loads(p.read_text())
        except (OSError, ValueError):
            return False
        return doc.get("job") == self.job_digest and doc.get("layout") == self.layout.digest()

    def write_head(self, source) -> None:
        """Embeddings, final norm, head (and a VLM's vision tower and projector): from the
        source, one tensor at a time, in the planned dtype (head_specs: the output dtype for
        the text model's floating tensors, the stored dtype for kept modules', so a cast to
        it leaves those as the checkpoint has them)."""
        for spec in self.layout.head:
            dtype = TORCH_DTYPES[spec.dtype]
            t = source.load([spec.name], dtype=dtype if dtype.is_floating_point else None)
            if TensorSpec.of(spec.name, t[spec.name]) != spec:
                raise QuantizerError(f"internal: {spec.name} loads as "
                                     f"{TensorSpec.of(spec.name, t[spec.name])}, planned {spec}")
            self._write({spec.name: t[spec.name]})
            del t
        atomic_write_json(self.layers_dir / HEAD_RECORD,
                          {"job": self.job_digest, "layout": self.layout.digest()})

    def finish(self, source, staged: Path) -> None:
        """Complete the shards in `staged` (this store's final folder): the non-layer tensors
        if not yet written, and the index."""
        if Path(staged).absolute() != self.final.absolute():
            raise QuantizerError(f"internal: the export is written in {self.final}, not "
                                 f"{staged}")
        self.check_files()
        if not self.head_written():
            self.write_head(source)
        text = self.layout.index_text()
        index = self.final / "model.safetensors.index.json"
        if text is not None:
            index.write_text(text)
        for extra in self.final.iterdir():  # an earlier export attempt's small files go
            if extra.name not in {s.file for s in self.layout.shards} and extra != index:
                if extra.is_file():
                    extra.unlink()


class LayerFileStore:
    """One safetensors file per finished layer in the job directory (earlier versions)."""

    def __init__(self, jobdir):
        self.jobdir = jobdir

    def save_layer(self, index: int, tensors: dict, meta: dict) -> None:
        self.jobdir.save_layer(STAGE, index, tensors, meta=meta)

    def load_layer(self, index: int) -> dict:
        return self.jobdir.load_layer(STAGE, index)[0]

    def commit(self, index: int) -> None:
        self.jobdir.commit_layer(STAGE, index)

    def layer_record(self, index: int) -> dict:
        return self.jobdir.layer_meta(STAGE, index)


class DirectJobStore(DirectStore):
    """A DirectStore bound to its job directory (commit = state.json, as for layer files)."""

    def __init__(self, jobdir, layout: ExportLayout):
        super().__init__(jobdir.path, layout, fingerprint_digest(jobdir.state["fingerprint"]))
        self.jobdir = jobdir

    def commit(self, index: int) -> None:
        self.jobdir.commit_layer(STAGE, index, has_file=False)


def job_digest(jobdir) -> str:
    return fingerprint_digest(jobdir.state["fingerprint"])


def use_direct_shards(jobdir) -> bool:
    """Direct shards for a job that has them or starts now; layer files for a job that has
    them, or when asked (LAYERQUANT_DIRECT_SHARDS=0), or when the installed safetensors lays
    out headers otherwise than layout.py does."""
    if DirectStore.present(jobdir.path):
        return True
    st = jobdir.state
    if st["layer_files"][STAGE] or st["last_finished"][STAGE] >= 0:
        if not st["layer_files"][STAGE]:
            raise InputError(f"job directory {jobdir.path} lost its export layout "
                             f"({LAYERS_DIR}/{LAYOUT_FILE}); pass --overwrite to start over")
        return False
    if os.environ.get("LAYERQUANT_DIRECT_SHARDS", "1") == "0":
        return False
    if not convention_holds():
        log.warning("this safetensors writes other headers than layerquant plans: finished "
                    "layers go to layer files and are assembled at the end")
        return False
    return True


def layer_records(jobdir) -> list[dict]:
    """The saved metadata of every finished layer of the quantize pass."""
    n = jobdir.next_layer(STAGE)
    if n and DirectStore.present(jobdir.path):
        store = DirectStore.open_existing(jobdir.path, job_digest(jobdir))
        return [store.layer_record(i) for i in range(n)]
    return [jobdir.layer_meta(STAGE, i) for i in range(n)]


def write_shards(job, jobdir, staged: Path, max_shard_bytes: int) -> None:
    """The export's tensors into `staged`: completed in place when the layers were written
    there directly, else assembled from the layer files (reading each back)."""
    if DirectStore.present(jobdir.path):
        DirectStore.open_existing(jobdir.path, job_digest(jobdir)).finish(job.source, staged)
        return
    if staged.exists():
        shutil.rmtree(staged)
    staged.mkdir(parents=True)
    source = job.source
    out_dtype = getattr(torch, job.settings.out_dtype)
    writer = ShardWriter(staged, max_shard_bytes)
    text, kept = job.arch.split_non_layer(source.non_layer_names())
    head = source.load(text, dtype=out_dtype)
    head.update(source.load(kept))  # a vision tower's and a projector's as stored
    writer.add(dict(sorted(head.items())))
    del head
    for i in range(source.num_layers):
        tensors, _ = jobdir.load_layer(STAGE, i)
        writer.add(dict(sorted(tensors.items())))
    writer.finish()


# ---- the plan ----------------------------------------------------------------------------
def head_specs(source, arch, out_dtype: torch.dtype) -> list[TensorSpec]:
    """The non-layer tensors as the export holds them. Those the text model uses: floating
    ones in the output dtype (a tensor known only by its logical name, e.g. a quantized
    original, loads as floating). A VLM's vision tower and projector (arch.split_non_layer):
    as the checkpoint stores them, never cast (a quantized original's dequantized in the
    dtype the checkpoint stands for)."""
    out_name = _dtype_name(out_dtype)
    text, kept = arch.split_non_layer(source.non_layer_names())
    out = []
    for name in text:
        stored = _stored_dtype(source, name, out_name)
        floating = TORCH_DTYPES[stored].is_floating_point
        out.append(TensorSpec(name, out_name if floating else stored,
                              tuple(int(v) for v in source.shape(name))))
    for name in kept:
        out.append(TensorSpec(name, _kept_dtype(source, name),
                              tuple(int(v) for v in source.shape(name))))
    return out


def _dtype_name(dtype: torch.dtype) -> str:
    return TensorSpec.of("x", torch.empty(0, dtype=dtype)).dtype


def _stored_dtype(source, name: str, default: str) -> str:
    stored = source._shapes.get(name, (None, default))[1]
    if stored not in TORCH_DTYPES:
        raise InputError(f"tensor {name} has dtype {stored}, which the export cannot hold")
    return stored


def _kept_dtype(source, name: str) -> str:
    """The dtype `source.load([name])` gives: the stored one, or for a weight stored
    quantized the float dtype its checkpoint stands for."""
    logical = source._logical.get(name)
    if logical is not None and logical.decoder != "plain":
        return _dtype_name(source.original.dtype)
    return _stored_dtype(source, name, "")


def _stand_in(out_f: int, in_f: int, bits: int, group_size: int, symmetric: bool,
              g_idx: bool):
    """A quantized weight of the right shapes and no values (meta device): what exporters
    turn into the tensor layout of a real one."""
    groups = 1 if group_size == -1 else in_f // group_size
    meta = torch.device("meta")
    return QuantizedWeight(
        codes=torch.empty((out_f, in_f), dtype=torch.uint8, device=meta),
        scales=torch.empty((out_f, groups), dtype=torch.float32, device=meta),
        zeros=torch.empty((out_f, groups), dtype=torch.int32, device=meta), bits=bits,
        group_size=group_size, symmetric=symmetric,
        g_idx=torch.empty(in_f, dtype=torch.int32, device=meta) if g_idx else None)


def plan_layout(job, model, exporter, method, max_shard_bytes: int) -> ExportLayout:
    """Every tensor the export will hold, from the model's meta layers (layer_loop's
    float_tensors) and the exporter run on meta stand-ins of each quantized linear, with the
    bits and group size the method will use (per-module settings where given, else the
    job's); cut into shards."""
    s = job.settings
    out_dtype = getattr(torch, s.out_dtype)
    module_settings = getattr(method, "module_settings", None) or {}
    act_order = bool(getattr(method, "act_order", s.gptq.act_order))
    static = bool(getattr(method, "static_groups", s.gptq.static_groups))
    linear_specs: dict[tuple, list[tuple[str, str, tuple]]] = {}  # stand-in key -> specs
    layers = decoder_layers(model)
    per_layer = []
    for i in range(job.source.num_layers):
        prefix = job.arch.layer_prefix(i)
        keys = {}
        for name in job.arch.for_layer(model.config, i).linears:
            full = f"{prefix}.{name}"
            bits, gs = module_settings.get(full, (s.bits, job.group_size))
            if not float(bits).is_integer():
                raise InputError(f"{full}: fractional --bits {bits} needs per-module settings "
                                 f"from a measurement (none given for this module)")
            linear = layers[i].get_submodule(name)
            assert isinstance(linear, nn.Linear)  # discovery names nn.Linear modules only
            out_f, in_f = linear.weight.shape
            key = (int(out_f), int(in_f), int(bits), int(gs), bool(s.symmetric),
                   act_order and not static and int(gs) != -1)
            if key not in linear_specs:
                tensors = exporter.linear_tensors("q", _stand_in(*key))
                linear_specs[key] = [(k[len("q."):], *_spec_fields(v))
                                     for k, v in tensors.items()]
            keys[name] = key
        specs = [TensorSpec.of(k, v) for k, v in
                 float_tensors(layers[i], prefix, keys, out_dtype).items()]
        specs += [TensorSpec(f"{prefix}.{name}.{suffix}", dtype, shape)
                  for name, key in keys.items() for suffix, dtype, shape in linear_specs[key]]
        per_layer.append(specs)
    return ExportLayout.plan(head_specs(job.source, job.arch, out_dtype), per_layer, max_shard_bytes)


def _spec_fields(t: torch.Tensor) -> tuple[str, tuple[int, ...]]:
    spec = TensorSpec.of("", t)
    return spec.dtype, spec.shape


def float_tensors(layer, prefix: str, quantized, out_dtype) -> dict:
    """Every tensor of the layer but the quantized linears' weights (norms, biases, routers,
    as the method left them) in the output dtype; of a layer still on the meta device, meta
    tensors of the same shapes (the export's layout is planned from them)."""
    out = {}
    for pname, p in layer.state_dict().items():
        if pname.rsplit(".", 1)[0] in quantized and pname.endswith(".weight"):
            continue
        out[f"{prefix}.{pname}"] = (torch.empty(p.shape, dtype=out_dtype, device="meta")
                                    if p.is_meta else p.detach().to("cpu", out_dtype).contiguous())
    return out
