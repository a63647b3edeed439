"""MMC4 documents: ShapesWorld writes both layouts, MMC4Documents reads them back, bad documents are skipped."""

import base64
import gzip
import io
import json
import random
from collections import Counter

import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from webdataset import TarWriter

from emu_lightning.data import StreamingDataModule
from emu_lightning.data.mmc4 import MMC4Documents
from emu_lightning.data.streaming import DataSourceError, add_skips, batch_skips
from emu_lightning.sequence import to_unit_range
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import write_shapesworld_mmc4

NUM_DOCS, PER_FILE = 12, 5  # three files: 5, 5 and 2 documents


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32)


@pytest.fixture(scope="module")
def jsonl(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmc4_jsonl")
    paths = write_shapesworld_mmc4(world, root, num_docs=NUM_DOCS, docs_per_file=PER_FILE)
    docs = [json.loads(line) for path in paths for line in open(path)]
    return root, paths, docs


@pytest.fixture(scope="module")
def wds(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("mmc4_wds")
    return root, write_shapesworld_mmc4(world, root, num_docs=NUM_DOCS, docs_per_file=PER_FILE, layout="wds")


def read(paths, **kwargs):
    """The documents, their uint8 images scaled to [0, 1] as the model does."""
    reader = MMC4Documents(paths, **{"image_size": 32, "shuffle": False, "repeat": False, **kwargs})
    return [
        {**s, "items": [to_unit_range(x) if isinstance(x, torch.Tensor) else x for x in s["items"]]} for s in reader
    ]


def images_of(sample):
    return [to_unit_range(x) for x in sample["items"] if isinstance(x, torch.Tensor)]


def png(colour, size=8):
    out = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(out, format="PNG")
    return out.getvalue()


def document(sentences, *images):
    """A document with images given as (name, matched_text_index, matched_sim)."""
    info = [{"image_name": n, "matched_text_index": i, "matched_sim": s} for n, i, s in images]
    return {"url": "https://example.invalid/doc", "text_list": sentences, "image_info": info}


def test_jsonl_round_trip_places_each_image_before_its_sentence(world, jsonl):
    root, paths, docs = jsonl
    assert paths == [str(root / f"docs_shard_{k:05d}_v2.jsonl") for k in range(3)]
    kept = [[i for i in d["image_info"] if i["matched_sim"] >= 0.32][:5] for d in docs]
    assert all(kept)  # every written story keeps an image at the default threshold
    samples = read(paths, image_dir=str(root / "images"))
    assert [s["id"] for s in samples] == [f"{paths[d // PER_FILE]}:{d % PER_FILE + 1}" for d in range(NUM_DOCS)]
    for sample, doc, keep in zip(samples, docs, kept):
        items, images = sample["items"], images_of(sample)
        assert len(images) == len(keep)
        texts = [x for x in items if isinstance(x, str)]
        assert " ".join(texts) == " ".join(doc["text_list"])  # every sentence once, in order, single spaces
        positions = [p for p, x in enumerate(items) if isinstance(x, torch.Tensor)]
        for p, info in zip(positions, keep):
            scene = int(info["image_name"].split("_")[1].split(".")[0])
            assert torch.allclose(items[p], world.image("train", scene), atol=1 / 255)
            assert items[p].shape == (3, 32, 32) and 0 <= items[p].min() and items[p].max() <= 1
            assert items[p + 1].startswith(doc["text_list"][info["matched_text_index"]])
            assert world.caption_correct(doc["text_list"][info["matched_text_index"]], world.scene("train", scene))


def test_threshold_and_image_limit(jsonl):
    root, paths, docs = jsonl
    image_dir = str(root / "images")
    sims = [i["matched_sim"] for d in docs for i in d["image_info"]]
    low = sum(s < 0.32 for s in sims)
    assert 0 < low < len(sims) / 4  # the writer puts some images below MMC4's threshold
    default = sum(len(images_of(s)) for s in read(paths, image_dir=image_dir))
    everything = sum(len(images_of(s)) for s in read(paths, image_dir=image_dir, sim_threshold=0.0))
    assert (default, everything) == (len(sims) - low, len(sims))
    one = read(paths, image_dir=image_dir, sim_threshold=0.0, max_images=1)
    assert [len(images_of(s)) for s in one] == [1] * NUM_DOCS
    assert all(isinstance(s["items"][1], torch.Tensor) for s in one)  # the first image follows the opening
    strict = MMC4Documents(paths, 32, image_dir=image_dir, sim_threshold=0.5, shuffle=False, repeat=False)
    assert strict.check() == {"ok": 0, "skipped": NUM_DOCS, "reasons": {"no_images": NUM_DOCS}}


def test_webdataset_layout_reads_like_jsonl(jsonl, wds):
    root, paths, _ = jsonl
    wds_root, shards = wds
    assert shards == [str(wds_root / f"{k:05d}.tar") for k in range(3)]
    from_jsonl = read(paths, image_dir=str(root / "images"))
    from_tars = read(str(wds_root / "*.tar"))
    assert [s["id"] for s in from_tars] == [f"{shards[d // PER_FILE]}:{d:09d}" for d in range(NUM_DOCS)]
    for a, b in zip(from_jsonl, from_tars):
        assert len(a["items"]) == len(b["items"])
        for x, y in zip(a["items"], b["items"]):
            assert torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y


def test_a_hand_made_document(tmp_path):
    (tmp_path / "red.png").write_bytes(png((255, 0, 0)))
    (tmp_path / "blue.png").write_bytes(png((0, 0, 255)))
    doc = document(
        ["Intro.", "  ", "First.", "Second.", "Third."],
        ("blue.png", 3, 0.40),
        ("red.png", 0, 0.50),
        ("red.png", 4, 0.10),  # below the threshold: dropped, not counted
        ("red.png", 9, 0.90),  # bad_index
        ("gone.png", 2, 0.90),  # missing_image
    )
    path = tmp_path / "doc.jsonl"
    path.write_text(json.dumps(doc) + "\n")
    source = MMC4Documents(str(path), 8, shuffle=False, repeat=False)  # images next to the jsonl file
    [sample] = list(source)
    red, blue = torch.tensor([1.0, 0, 0]), torch.tensor([0, 0, 1.0])
    kinds = [x if isinstance(x, str) else tuple(to_unit_range(x)[:, 0, 0].tolist()) for x in sample["items"]]
    assert kinds == [tuple(red.tolist()), "Intro. First.", tuple(blue.tolist()), "Second. Third."]
    assert sample["items"][0].shape == (3, 8, 8)
    assert sample["skipped"] == {"bad_index": 1, "missing_image": 1}
    limited = list(MMC4Documents(str(path), 8, max_images=1, shuffle=False, repeat=False))
    first = limited[0]["items"][0]  # the first image in text order (red), not the first in image_info (blue)
    assert len(images_of(limited[0])) == 1 and isinstance(first, torch.Tensor) and first[0, 0, 0] == 255


def test_broken_jsonl_files_are_skipped_with_reasons(tmp_path):
    (tmp_path / "ok.png").write_bytes(png((0, 255, 0)))
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n but not really")
    good = document(["a sentence."], ("ok.png", 0, 0.4))
    lines = [
        json.dumps(good),
        '{"text_list": ["cut off',  # malformed_json
        "[1, 2, 3]",  # JSON, but not a document: malformed_json
        json.dumps({"text_list": "not a list", "image_info": []}),  # malformed_json
        "",  # blank lines are not documents
        json.dumps(document([" ", ""], ("ok.png", 0, 0.4))),  # empty_text
        json.dumps(document(["low."], ("ok.png", 0, 0.1))),  # no_images
        json.dumps(document(["gone."], ("gone.png", 0, 0.9))),  # missing_image + no_images
        json.dumps(document(["bad."], ("bad.png", 0, 0.9), ("ok.png", 0, 0.35))),  # corrupt_image, still used
        json.dumps(good),
    ]
    (tmp_path / "docs.jsonl").write_text("\n".join(lines) + "\n")
    noise = [random.Random(i).randbytes(100).hex() + "." for i in range(400)]  # barely compressible
    many = [json.dumps(document([text], ("ok.png", 0, 0.4))) for text in noise]
    compressed = gzip.compress(("\n".join(many) + "\n").encode())
    (tmp_path / "cut.jsonl.gz").write_bytes(compressed[: len(compressed) // 2])
    (tmp_path / "whole.jsonl.gz").write_bytes(gzip.compress((json.dumps(good) + "\n").encode()))
    paths = [str(tmp_path / n) for n in ("docs.jsonl", "missing.jsonl", "whole.jsonl.gz", "cut.jsonl.gz")]
    source = MMC4Documents(paths, 8, shuffle=False, repeat=False)
    result = source.check()
    cut_ok = result["ok"] - 4  # the gzip cut in half yields its first documents, then stops
    assert 0 < cut_ok < len(many)
    reasons = {
        "malformed_json": 3,
        "empty_text": 1,
        "no_images": 2,
        "missing_image": 1,
        "corrupt_image": 1,
        "unreadable_file": 2,
    }
    assert result == {"ok": 4 + cut_ok, "skipped": 10, "reasons": reasons}
    samples = list(source)
    assert [s["id"] for s in samples][:4] == [f"{paths[0]}:1", f"{paths[0]}:9", f"{paths[0]}:10", f"{paths[2]}:1"]
    assert len(images_of(samples[1])) == 1 and samples[1]["items"][1] == "bad."
    carried = Counter()
    for sample in samples:
        add_skips(carried, sample["skipped"])
    assert dict(source.skipped) == reasons and carried == Counter({**reasons, "unreadable_file": 1})


def test_broken_tar_shards_are_skipped_with_reasons(wds, tmp_path):
    _, shards = wds
    good = document(["a sentence."], ("ok.png", 0, 0.4))
    good["image_info"][0]["image_base64"] = base64.b64encode(png((0, 255, 0))).decode()
    bad_base64 = json.loads(json.dumps(good))
    bad_base64["image_info"][0]["image_base64"] = "%%% not base64 %%%"
    no_base64 = json.loads(json.dumps(good))
    del no_base64["image_info"][0]["image_base64"]
    bad_index = json.loads(json.dumps(good))
    bad_index["image_info"][0]["matched_text_index"] = 1
    members = [{"json": json.dumps(doc).encode()} for doc in (good, bad_base64, no_base64, bad_index)]
    members += [{"json": b"not json"}, {"txt": b"a sample without a .json member"}, {"json": json.dumps(good).encode()}]
    path = tmp_path / "mixed.tar"
    with TarWriter(str(path), encoder=False, mtime=0) as sink:
        for k, member in enumerate(members):
            sink.write({"__key__": f"{k:04d}", **member})
    data = open(shards[0], "rb").read()
    (tmp_path / "cut.tar").write_bytes(data[: len(data) // 2])
    paths = [str(path), str(tmp_path / "cut.tar")]
    source = MMC4Documents(paths, 8, shuffle=False, repeat=False)
    result = source.check()
    cut_ok = result["ok"] - 2
    assert 0 < cut_ok < PER_FILE
    reasons = {
        "corrupt_image": 1,
        "missing_image": 1,
        "bad_index": 1,
        "no_images": 3,
        "malformed_json": 2,
        "unreadable_file": 1,
    }
    assert result == {"ok": 2 + cut_ok, "skipped": 9, "reasons": reasons}
    assert [s["id"] for s in read(paths, image_size=8)][:2] == [f"{path}:0000", f"{path}:0006"]


def test_a_source_of_only_bad_documents_stops_with_the_reasons(tmp_path):
    (tmp_path / "bad.jsonl").write_text("not json\n" + json.dumps(document(["x."], ("gone.png", 0, 0.9))) + "\n")
    source = MMC4Documents(str(tmp_path / "*.jsonl"), 8, shuffle=False)
    with pytest.raises(DataSourceError) as error:
        next(iter(source))
    for reason in ("malformed_json: 1", "missing_image: 1", "no_images: 1"):
        assert reason in str(error.value)


def test_seeded_shuffle_and_two_workers(jsonl):
    root, paths, _ = jsonl
    image_dir = str(root / "images")

    def ids(seed):
        return [s["id"] for s in MMC4Documents(paths, 32, image_dir=image_dir, seed=seed, repeat=False)]

    in_order = [s["id"] for s in read(paths, image_dir=image_dir)]
    assert ids(5) == ids(5) and ids(5) != ids(6) and sorted(ids(5)) == sorted(in_order)
    first_file = [i for i in ids(5) if i.startswith(paths[0])]
    assert first_file != sorted(first_file)  # documents are shuffled within a file too
    workers = MMC4Documents(paths, 32, image_dir=image_dir, seed=5, repeat=False)
    two = [s["id"] for s in DataLoader(workers, batch_size=None, num_workers=2)]
    assert sorted(two) == sorted(in_order)  # each document exactly once


def test_datamodule_batches_train_the_model(jsonl, wds, tiny_model):
    root, paths, _ = jsonl
    wds_root, _ = wds
    dm = StreamingDataModule(
        MMC4Documents(paths, image_size=16, image_dir=str(root / "images")),
        val={"paths": str(wds_root / "{00000..00002}.tar")},
        batch_size=3,
        sequencer=tiny_model.sequencer,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    counts = batch["image_counts"]
    assert batch["images"].shape == (int(counts.sum()), 3, 16, 16) and (counts >= 1).all()
    assert (batch["input_ids"] == tiny_model.image_id).sum() == counts.sum() * tiny_model.num_queries
    assert torch.isfinite(tiny_model.losses(batch)["loss"])
    val = list(dm.val_dataloader())
    assert sum(len(b["id"]) for b in val) == NUM_DOCS and all(not batch_skips(b) for b in val)


def test_bad_paths_are_named(tmp_path):
    with pytest.raises(ValueError, match="matches no file"):
        MMC4Documents(str(tmp_path / "*.jsonl"), 32).units()
    (tmp_path / "docs.json").write_text("{}")
    with pytest.raises(ValueError, match="docs.json' is not an MMC4 file"):
        MMC4Documents(str(tmp_path / "docs.json"), 32).units()
    with pytest.raises(ValueError, match="max_images 0"):
        MMC4Documents(str(tmp_path / "docs.jsonl"), 32, max_images=0)
