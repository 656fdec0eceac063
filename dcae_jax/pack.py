"""Pack a large image folder into ArrayRecord shards, so a pod reads a few hundred files instead of millions.

    python -m dcae_jax.pack --src=/data/photos --dest=gs://my-bucket/photos-ar [--images_per_shard=1024]
    python -m dcae_jax.main --config=configs/finetune.py:data=arrayrecord:gs://my-bucket/photos-ar ...

SRC (local or gs://) is read as `folder:SRC` reads it (train/ val/ ... split subfolders, class sub-folders as
labels); DEST (local or gs://) gets one shard set per split and manifest.json (counts, byte sizes, every skipped file
with its reason). Every image is decoded before it is packed; its file's bytes are stored unchanged. Rerun the same
command after an interruption: finished shards are kept, not uploaded again. Format: `dcae_jax.data.shards`.
"""

from __future__ import annotations

import sys

from dcae_jax.runtime import cli


def define_flags(f: cli.Flags) -> None:
    f.string("src", None, "Image folder (local or gs://; folder:DIR works too).", required=True)
    f.string("dest", None, "Output folder for the shards and manifest.json (local or gs://).", required=True)
    f.integer("images_per_shard", 1024, "Source image files per shard.", lower_bound=1)
    f.integer("min_side", 0, "Leave out (and list) images whose short side is below this.", lower_bound=0)
    f.integer("read_threads", 16, "Files read and decoded in parallel.", lower_bound=1)


def _progress(split: str, shard: dict) -> None:
    print(f"pack: {shard['file']}: {shard['num_records']} images, {shard['num_skipped']} skipped", file=sys.stderr)


def body(flags) -> int:
    from dcae_jax.data import shards

    r = shards.pack_folder(**cli.values(flags), progress=_progress)
    m = r.manifest
    for name, s in m["splits"].items():
        labels = f"{len(s['class_names'])} classes" if s["label_source"] == "folder" else s["label_source"]
        print(
            f"{name}: {s['num_shards']} shards, {s['num_images']} images, {s['num_skipped']} skipped; labels: {labels}"
        )
    for name, s in m["splits"].items():
        for skip in s["skipped"][:5]:
            print(f"note: skipped {name}/{skip['file']}: {skip['reason']}", file=sys.stderr)
    print(
        f"wrote {r.written} shards ({r.kept} already there) and {r.manifest_path}: {m['num_images']} images, "
        f"{m['num_skipped']} skipped (listed there with the reason)"
    )
    print(f"read it with --data=arrayrecord:{flags.dest}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("pack", __doc__, define_flags, body, argv, verbosity="warning")


if __name__ == "__main__":
    cli.exit_with(main())
