"""Cast a Kimi Linear checkpoint to another dtype and/or cut it into shards of a given size, streaming.

    python conversion/reshard.py SRC --out DST --dtype bfloat16 --max-shard-size 5GB
    python conversion/reshard.py SRC --out DST --max-shard-size 2GiB            # reshard only, dtype kept

--dtype bfloat16 | float16 | float32 | keep (default keep). A_log, dt_bias and e_score_correction_bias stay float32
(the model holds them in float32) unless --cast-all. Sizes take B, KB, MB, GB, TB (powers of 1000, as transformers)
or KiB, MiB, GiB, TiB. The output gets model.safetensors or model-0000i-of-0000n.safetensors with
model.safetensors.index.json, config.json with `dtype` set, every other non-weight file copied, and a fresh
kimi_linear_manifest.json (sha256 of every shard, computed while writing).

Memory: the shard plan is made from the source headers (io.ShardWriter with specs), so each output shard's header
is written first and then every tensor is read, cast and written straight to disk, one at a time. Peak memory is
about one source tensor plus its cast copy, whatever the shard size. Written to a temporary folder, renamed when
complete.
"""

import argparse
import json
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from kimi_linear_conversion.from_released import (
    MANIFEST,
    build_manifest,
    carried_files,
    copy_entry,
    read_config,
    resolve_source,
    write_manifest,
)
from kimi_linear_conversion.io import (
    _DTYPE_BYTES,
    CLI_ERRORS,
    ST_DTYPES,
    CheckpointError,
    CheckpointReader,
    ShardWriter,
    atomic_output,
    holds_model,
    parse_size,
)

KEEP_FP32 = ("A_log", "dt_bias", "e_score_correction_bias")
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
FLOAT_ST = {"BF16", "F16", "F32", "F64"}


def target_st_dtype(name, st_dtype, dtype, cast_all):
    """The safetensors dtype `name` gets: floats cast to `dtype` (None: kept), the float32 parameters kept float32."""
    if st_dtype not in FLOAT_ST:
        return st_dtype
    if not cast_all and name.rsplit(".", 1)[-1] in KEEP_FP32:
        return "F32"
    return st_dtype if dtype is None else ST_DTYPES[dtype]


_TORCH = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "F64": torch.float64}


def reshard(
    source,
    out,
    dtype="keep",
    max_shard_size="5GB",
    cast_all=False,
    overwrite=False,
    progress=True,
):
    """Write `source` (folder or cached Hub id) to `out` cast to `dtype` in shards of at most `max_shard_size`."""
    if dtype not in (*DTYPES, "keep"):
        raise ValueError(f"dtype must be one of {[*DTYPES, 'keep']}, not {dtype!r}")
    max_bytes = parse_size(max_shard_size)
    src = resolve_source(source)
    out = Path(out).expanduser()
    if out.resolve() == src.resolve():
        raise CheckpointError("the output folder must differ from the source folder.")
    if holds_model(out) and not overwrite:
        raise FileExistsError(f"{out} already holds a model; choose another output folder or pass --overwrite.")
    torch_dtype = None if dtype == "keep" else DTYPES[dtype]
    config = read_config(src)
    reader = CheckpointReader(src)
    order = sorted(reader.location, key=lambda n: (reader.location[n], n))  # source file order: each read once
    target = {n: target_st_dtype(n, reader.dtypes[n], torch_dtype, cast_all) for n in order}
    unknown = sorted({reader.dtypes[n] for n in order} - set(_DTYPE_BYTES))
    if unknown:
        raise CheckpointError(f"{src}: tensors of dtype {unknown} are not supported.")
    total = sum(reader.nbytes(n) for n in order)

    with atomic_output(out, overwrite=overwrite) as tmp:
        for name in carried_files(src, skip={"config.json", MANIFEST}):
            copy_entry(src / name, tmp / name)
        config_out = dict(config)
        if torch_dtype is not None:
            config_out["dtype"] = dtype
            if "torch_dtype" in config_out:
                config_out["torch_dtype"] = dtype
        (tmp / "config.json").write_text(json.dumps(config_out, indent=2, ensure_ascii=False) + "\n")

        bar = tqdm(total=total, unit="B", unit_scale=True, desc="reshard", disable=not progress)

        def tensors():
            for name in order:
                t = reader.get(name)
                want = _TORCH.get(target[name])
                t = t.to(want) if want is not None and t.dtype != want else t
                bar.update(reader.nbytes(name))
                yield name, t

        specs = [(n, _TORCH[target[n]], reader.shapes[n]) for n in order]
        with ShardWriter(tmp, max_shard_bytes=max_bytes, specs=specs) as writer:
            for name, t in tensors():
                writer.add(name, t)
        bar.close()
        reader.close()
        write_manifest(tmp, build_manifest(tmp, writer.hashes, source=str(source), progress=progress))
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("source", help="checkpoint folder (or Hub id in the local Hub cache)")
    ap.add_argument("--out", required=True, help="output folder (must not hold a model unless --overwrite)")
    ap.add_argument("--dtype", default="keep", choices=[*DTYPES, "keep"], help="(default: %(default)s)")
    ap.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB (default: %(default)s)")
    ap.add_argument("--cast-all", action="store_true", help="cast A_log, dt_bias, e_score_correction_bias too")
    ap.add_argument("--overwrite", action="store_true", help="replace an output folder that holds a model")
    ap.add_argument("--quiet", action="store_true", help="no progress bars")
    args = ap.parse_args(argv)
    try:
        out = reshard(
            args.source,
            args.out,
            args.dtype,
            args.max_shard_size,
            args.cast_all,
            args.overwrite,
            not args.quiet,
        )
    except CLI_ERRORS as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
