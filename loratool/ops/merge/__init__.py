"""``merge`` and ``unmerge``: add (subtract) adapter deltas into a base checkpoint, streaming.

The normative semantics, the ``loratool.merged`` provenance record and the numerical
guarantees are in spec/merge.md; this module implements them.

* Streaming (``streaming``): the output is written in the base's own tensor order, header
  first; a reader thread, the merge and a writer thread each work on their own tensor.
* Exact (CPU, the default): ``W + sum_i s_i * delta_i`` is evaluated in float64 and rounded
  once to the stored dtype, in numpy (``exact.NumpyExactEngine``). float64 ->
  bf16/fp16 goes through float32 rounded to odd, because a float64 -> bf16/fp16 conversion
  through float32 rounded to nearest rounds twice (torch's own ``.to`` does).
* No torch unless needed: safetensors adapters (loratool, PEFT, kohya; no DoRA or
  replacement entries) are read as numpy arrays, so ``merge`` on a safetensors base on the
  CPU never imports torch; pickles, LyCORIS LoHa/LoKr, DoRA, replacements, ``.pt`` files and
  CUDA load torch. The engine is the same, so are the output bytes.
* Fast (CUDA): the same sum in float32 on the device; reading, transfer and writing overlap.

The package, in the order a merge runs: ``options`` (arguments), ``job`` (``MergeJob`` and
``run``), ``npadapter`` (safetensors adapters as numpy), ``plan`` (base tensor -> updates),
``provenance`` (adapter identity, ``loratool.merged`` records), ``exact`` and
``torch_engine`` (the engines; ``operands``: the compiled kernel's operands, once per
tensor), ``streaming`` and ``writers`` (the outputs).
"""

from __future__ import annotations

from .job import MergeJob, MergeReport
from .job import run as _run_checkpoint
from .options import DEVICE_CHOICES, DTYPE_CHOICES, OUTPUT_FORMATS, parse_adapter_spec
from .plan import MERGEABLE_DTYPES
from .provenance import adapter_identity, merged_checkpoint_report

__all__ = ["DEVICE_CHOICES", "DTYPE_CHOICES", "MERGEABLE_DTYPES", "OUTPUT_FORMATS",
           "MergeReport", "adapter_identity", "merge", "merged_checkpoint_report",
           "parse_adapter_spec", "unmerge"]


def merge(base, adapters, *, output=None, device: str = "auto", dtype: str = "keep",
          name_map=None, allow_missing: bool = False, overwrite: bool = False,
          fsync: bool = False, progress=None, output_format: str | None = None,
          adapter_options: dict | None = None, gguf_type: str | None = None,
          allow_no_change: bool = False) -> MergeReport:
    """Merge adapters into a base checkpoint and write a new checkpoint (never the input).

    ``adapters`` is a list of ``(path_or_Adapter, scale)`` pairs (a bare path or Adapter means
    scale 1.0). ``base`` is a ``.safetensors`` file, a sharded Hugging Face directory or a
    ``.pt``/``.bin`` state dict. ``adapter_options`` supplies what foreign adapter files do
    not store (``alpha``, ``enable_lora``, ``fan_in_fan_out``, ``allow_unknown``).
    A GGUF ``base`` (llama.cpp; a split set given by any part) is merged by
    ``loratool.gguf.merge_gguf`` and returns a ``GGUFMergeReport`` with the retained delta;
    ``dtype="keep"`` requantizes each tensor to its own type, ``gguf_type`` ("q8_0", "f16",
    ...) writes every merged tensor in that type.
    Tensors ``allow_unknown`` drops are listed in the report's ``dropped``. A merge that would change
    no tensor raises LT431 unless ``allow_no_change``. Replacement entries (PEFT
    ``modules_to_save``, trained biases, saved embeddings, trainable tokens) overwrite their
    base tensors before any low-rank update is added.
    ``progress(advance_bytes, total_bytes)`` is called as each tensor has been written (from
    the writer thread).

    >>> import os, tempfile
    >>> out = os.path.join(tempfile.mkdtemp(), "merged.safetensors")
    >>> merge("examples/base.safetensors", [("examples/adapter.safetensors", 0.8)],
    ...       output=out).modules_merged
    8
    """
    return _run(MergeJob("merge", base, adapters, output=output, device=device, dtype=dtype,
                        name_map=name_map, allow_missing=allow_missing, overwrite=overwrite,
                        fsync=fsync, progress=progress, output_format=output_format,
                        adapter_options=adapter_options, gguf_type=gguf_type,
                        allow_no_change=allow_no_change))


def _run(job: MergeJob):
    """A diffusers pipeline directory is merged component by component (``pipeline``, which
    runs a job per component); anything else is one checkpoint (``job.run``)."""
    import os
    from .pipeline import is_pipeline, run_pipeline
    if is_pipeline(os.fspath(job.base)):
        return run_pipeline(job)
    return _run_checkpoint(job)


def unmerge(merged, adapters, *, output=None, device: str = "auto", dtype: str = "keep",
            name_map=None, allow_missing: bool = False, overwrite: bool = False,
            fsync: bool = False, progress=None, output_format: str | None = None,
            force: bool = False, adapter_options: dict | None = None,
            gguf_type: str | None = None, allow_no_change: bool = False) -> MergeReport:
    """Subtract adapters merged earlier (the inverse of ``merge``); checks each adapter and
    scale against the checkpoint's ``loratool.merged`` record unless ``force``. A GGUF
    ``merged`` file is unmerged when every adapted tensor is F32/F16/BF16 (else LT335:
    requantizing is not invertible); it has no record to check.
    DoRA modules (LT414) and replacement entries (LT430) cannot be inverted and are refused.

    >>> import os, tempfile
    >>> merged = os.path.join(tempfile.mkdtemp(), "merged.safetensors")
    >>> _ = merge("examples/base.safetensors", [("examples/adapter.safetensors", 0.8)],
    ...           output=merged)
    >>> os.path.basename(unmerge(merged, [("examples/adapter.safetensors", 0.8)]).output)
    'merged-unmerged.safetensors'
    """
    return _run(MergeJob("unmerge", merged, adapters, output=output, device=device,
                        dtype=dtype, name_map=name_map, allow_missing=allow_missing,
                        overwrite=overwrite, fsync=fsync, progress=progress,
                        output_format=output_format, force=force,
                        adapter_options=adapter_options, gguf_type=gguf_type,
                        allow_no_change=allow_no_change))
