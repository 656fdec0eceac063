"""Reading images from ArrayRecord shards (python -m dcae_jax.pack) vs the plain folder, on this machine.

    python -m bench.data_read --photos=PHOTOS --copies=10 --work=/tmp/data_read [--repeats=3] [--read_threads=16]

Every image under PHOTOS is copied --copies times with distinct names into WORK/folder (flat), which is packed into
WORK/shards once (the pack command's library call, timed). Then, interleaved folder / shards for --repeats rounds
(medians reported):

- open: building the source with `make_source` (listing the folder vs reading the manifest and opening the shards),
  the cost every host of a pod pays at start-up, per file for the folder;
- raw: every record's bytes, no decoding, one thread (opening a file per image vs a record of an open shard);
- pipeline: one epoch of `make_train_loader` at 256 px (decode + guided-diffusion random crop + flip, batches of 32,
  --read_threads decoding threads), what the trainer reads.

The page cache is warm (the set is read once before timing): no network or cold-disk latency, which is where the
folder's per-file cost grows on a pod. Prints the processor beside the numbers.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import time

from bench.conv import processor


def make_set(photos: pathlib.Path, copies: int, folder: pathlib.Path) -> int:
    """`copies` copies of every image under `photos` in `folder`, named k_name (made once, reused)."""
    from dcae_jax.data.images import list_images

    files = list_images(photos)
    want = len(files) * copies
    if folder.is_dir() and sum(1 for _ in folder.iterdir()) == want:
        return want
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    for k in range(copies):
        for f in files:
            shutil.copyfile(f, folder / f"{k:02d}_{f.parent.name}_{f.name}")
    return want


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main(argv=None) -> None:
    from dcae_jax.runtime import cli

    cli.prepare_process(argv)  # before jax starts: no probe for an absent TPU; the host allocator policy
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--photos", required=True, help="A folder of photos (searched recursively).")
    p.add_argument("--copies", type=int, default=10)
    p.add_argument("--work", default="/tmp/data_read")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--read_threads", type=int, default=16)
    p.add_argument("--resolution", type=int, default=256)
    args = p.parse_args(argv)

    from dcae_jax.data import pipeline, shards

    work = pathlib.Path(args.work)
    n = make_set(pathlib.Path(args.photos), args.copies, work / "folder")
    shutil.rmtree(work / "shards", ignore_errors=True)
    pack_s = timed(lambda: shards.pack_folder(str(work / "folder"), str(work / "shards"), read_threads=16))
    specs = {"folder": f"folder:{work / 'folder'}", "shards": f"arrayrecord:{work / 'shards'}"}
    size = {
        "folder": sum(f.stat().st_size for f in (work / "folder").iterdir()),
        "shards": sum(f.stat().st_size for f in (work / "shards").rglob("*.array_record")),
    }
    sources = {k: pipeline.make_source(s, "train") for k, s in specs.items()}

    def raw(kind: str) -> None:
        src = sources[kind]
        if kind == "folder":
            for path in src.paths:
                with open(path, "rb") as f:
                    f.read()
        else:
            for i in range(len(src)):
                src[i]["image"]

    def epoch(kind: str) -> None:
        it = pipeline.make_train_loader(
            sources[kind],
            resolution=args.resolution,
            global_batch_size=32,
            seed=0,
            num_epochs=1,
            read_threads=args.read_threads,
        )
        for _ in it:
            pass

    for kind in sources:
        raw(kind)  # warm the page cache
    times: dict[tuple[str, str], list[float]] = {}
    for _ in range(args.repeats):
        for kind, spec in specs.items():
            times.setdefault(("open", kind), []).append(timed(lambda spec=spec: pipeline.make_source(spec, "train")))
            times.setdefault(("raw", kind), []).append(timed(lambda kind=kind: raw(kind)))
            times.setdefault(("pipeline", kind), []).append(timed(lambda kind=kind: epoch(kind)))
    med = {key: statistics.median(t) for key, t in times.items()}
    batches = n // 32 * 32  # the epoch drops the last partial batch
    count = {"open": 1, "raw": n, "pipeline": batches}
    scale = {"open": 1e3, "raw": 1.0, "pipeline": 1.0}  # ms for open, images/s for the others

    def cell(what: str, kind: str) -> str:
        vals = [count[what] / t if what != "open" else t * scale[what] for t in times[(what, kind)]]
        v = count[what] / med[(what, kind)] if what != "open" else med[(what, kind)] * scale[what]
        return (
            f"{v:.1f} ({min(vals):.1f}-{max(vals):.1f})"
            if what == "open"
            else f"{v:.0f} ({min(vals):.0f}-{max(vals):.0f})"
        )

    def ratio(what: str) -> float:
        return (
            med[(what, "folder")] / med[(what, "shards")]
            if what != "open"
            else med[(what, "shards")] / med[(what, "folder")]
        )

    print(f"processor: {processor()}; {n} images ({size['folder'] / 2**20:.0f} MiB) in {args.work}")
    print(f"packed into {len(sources['shards'].files)} shards ({size['shards'] / 2**20:.0f} MiB) in {pack_s:.1f} s")
    print("| median (min-max) | folder | shards | shards / folder |\n|---|---:|---:|---:|")
    rows = {
        "open": "open (make_source), ms",
        "raw": "raw bytes, images/s (1 thread)",
        "pipeline": f"make_train_loader {args.resolution} px, images/s ({args.read_threads} threads)",
    }
    for what, label in rows.items():
        print(f"| {label} | {cell(what, 'folder')} | {cell(what, 'shards')} | {ratio(what):.2f} |")
    print(f"({args.repeats} interleaved repeats, medians; os.cpu_count() = {os.cpu_count()})")


if __name__ == "__main__":
    main()
