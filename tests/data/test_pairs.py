"""img2dataset webdataset shards: ShapesWorld writes them, ImageTextShards reads them back, bad samples are skipped."""

import io
import tarfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader
from webdataset import TarWriter

from emu_lightning.data import StreamingDataModule
from emu_lightning.data.pairs import ImageTextShards, decode_image, opened, shard_pattern, tar_records
from emu_lightning.data.streaming import DataSourceError, Skip, add_skips, batch_skips
from emu_lightning.sequence import to_unit_range
from emu_lightning.shapesworld.world import ShapesWorld
from emu_lightning.shapesworld.writers import shapesworld_caption, shapesworld_pair_record, write_shapesworld_pairs

NUM, SHARD = 20, 8  # three shards: 8, 8 and 4 samples


@pytest.fixture(scope="module")
def world():
    return ShapesWorld(image_size=32)


@pytest.fixture(scope="module")
def shards(world, tmp_path_factory):
    root = tmp_path_factory.mktemp("pairs")
    paths = write_shapesworld_pairs(world, root, num_samples=NUM, shard_size=SHARD)
    return root, paths


def parts(sample):
    """(image, caption) of a pair, whichever comes first."""
    image = next(x for x in sample["items"] if isinstance(x, torch.Tensor))
    caption = next(x for x in sample["items"] if isinstance(x, str))
    return to_unit_range(image), caption


def write_shard(path, records):
    with TarWriter(str(path), encoder=False, mtime=0) as sink:
        for record in records:
            sink.write(record)
    return str(path)


def test_round_trip_pairs_each_caption_with_its_image(world, shards):
    root, paths = shards
    assert paths == [str(root / f"{k:05d}.tar") for k in range(3)]
    source = ImageTextShards(shard_pattern(root, 3), image_size=32, shuffle=False, repeat=False)
    assert source.check() == {"ok": NUM, "skipped": 0, "reasons": {}}
    samples = list(source)
    assert [s["id"] for s in samples] == [f"{i:09d}" for i in range(NUM)]
    assert [s["url"] for s in samples] == [paths[i // SHARD] for i in range(NUM)]
    for i, sample in enumerate(samples):
        image, caption = parts(sample)
        assert len(sample["items"]) == 2 and sample["source"] == "pairs" and sample["skipped"] is None
        assert caption == shapesworld_caption(world, "train", i, None)
        assert caption in world.captions(world.scene("train", i))
        assert image.shape == (3, 32, 32) and image.dtype == torch.float32
        assert torch.allclose(image, world.image("train", i), atol=1 / 255)  # PNG: exact up to rounding
    first = sum(isinstance(s["items"][0], torch.Tensor) for s in samples)
    assert 0 < first < NUM  # image_first_prob 0.5: both orders
    small = ImageTextShards(paths, image_size=16, image_first_prob=1.0, shuffle=False, repeat=False)
    resized = list(small)
    assert all(s["items"][0].shape == (3, 16, 16) and isinstance(s["items"][1], str) for s in resized)
    assert all(s["items"][0].dtype == torch.uint8 for s in resized)  # scaled to [0, 1] by the model
    piped = ImageTextShards(f"pipe:cat {paths[2]}", image_size=32, image_first_prob=0.0, repeat=False)
    assert sorted(s["id"] for s in piped) == [f"{i:09d}" for i in range(16, NUM)]


def test_written_json_and_caption_choice(world, tmp_path):
    paths = write_shapesworld_pairs(world, tmp_path, split="val", num_samples=3, shard_size=5, caption_ids=[1])
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
        meta = tar.extractfile("000000002.json").read().decode()
    assert names == [f"00000000{i}.{ext}" for i in range(3) for ext in ("json", "png", "txt")]
    caption = world.captions(world.scene("val", 2))[1]
    assert f'"caption": "{caption}"' in meta and '"status": "success"' in meta and '"width": 32' in meta
    jpeg = shapesworld_pair_record(world, "val", 0, "jpg", None)
    assert jpeg["jpg"][:2] == b"\xff\xd8" and "png" not in jpeg
    with pytest.raises(ValueError, match="caption_ids"):
        write_shapesworld_pairs(world, tmp_path, num_samples=1, caption_ids=[7])
    with pytest.raises(ValueError, match="image_format 'gif'"):
        write_shapesworld_pairs(world, tmp_path, num_samples=1, image_format="gif")


def test_broken_shards_are_skipped_with_reasons(world, shards, tmp_path):
    _, paths = shards
    # Shard 1 cut in the middle of sample 11's image: samples 8-10 survive, 11 is lost with the damage.
    with tarfile.open(paths[1]) as tar:
        cut = tar.getmember("000000011.png")
        cut = cut.offset_data + cut.size // 2
    truncated = tmp_path / "truncated.tar"
    truncated.write_bytes(open(paths[1], "rb").read()[:cut])
    records = [shapesworld_pair_record(world, "train", i, "png", None) for i in range(7)]
    del records[0]["txt"]
    del records[1]["png"]
    records[2]["txt"] = b" \n\t "
    records[3]["png"] = b"not an image at all"
    records[4]["png"] = records[4]["png"][: len(records[4]["png"]) // 2]  # truncated PNG bytes
    records[5]["jpg"] = records[5].pop("png")  # any image extension will do; sample 6 is intact
    mixed = write_shard(tmp_path / "mixed.tar", records)
    not_tar = tmp_path / "not_a.tar"
    not_tar.write_bytes(b"hello world" * 100)
    urls = [paths[0], str(truncated), str(tmp_path / "missing.tar"), mixed, str(not_tar)]
    source = ImageTextShards(urls, image_size=32, shuffle=False, repeat=False)
    reasons = {
        "unreadable_shard": 3,
        "missing_caption": 1,
        "missing_image": 1,
        "empty_caption": 1,
        "corrupt_image": 2,
    }
    assert source.check() == {"ok": 8 + 3 + 2, "skipped": 8, "reasons": reasons}
    samples = list(source)
    expected = [f"{i:09d}" for i in [*range(11), 5, 6]]
    assert [s["id"] for s in samples] == expected
    carried = Counter()
    for sample in samples:
        add_skips(carried, sample["skipped"])
    assert dict(source.skipped) == reasons
    # Skips travel with the next sample; the trailing not-a-tar skip has none after it.
    assert carried == Counter({**reasons, "unreadable_shard": 2})
    for sample in samples:
        image, caption = parts(sample)
        i = int(sample["id"])
        assert caption == shapesworld_caption(world, "train", i, None)
        assert torch.allclose(image, world.image("train", i), atol=1 / 255)


def test_a_source_of_only_bad_samples_stops_with_the_reasons(world, tmp_path):
    record = shapesworld_pair_record(world, "train", 0, "png", None)
    del record["txt"]
    bad = write_shard(tmp_path / "bad.tar", [record])
    source = ImageTextShards([bad, str(tmp_path / "missing.tar")], image_size=32, shuffle=False)
    with pytest.raises(DataSourceError) as error:
        next(iter(source))
    assert "missing_caption: 1" in str(error.value) and "unreadable_shard: 1" in str(error.value)
    assert source.check()["ok"] == 0


def test_a_failing_pipe_command_is_damage_but_an_early_stop_is_quiet(shards):
    _, paths = shards
    failing = ImageTextShards(f"pipe:cat {paths[0]}; exit 2", image_size=32, shuffle=False, repeat=False)
    assert failing.check()["reasons"] == {"unreadable_shard": 1}
    stream = iter(failing)
    next(stream)
    stream.close()  # the command exits 2 once its reader is gone: that is no error


def test_a_pipe_command_that_failed_before_the_first_read_still_gives_its_bytes_then_fails(shards):
    _, paths = shards
    size = Path(paths[0]).stat().st_size
    read = []
    with pytest.raises(OSError, match="exit 2"):  # on close: the command failed
        with opened(f"pipe:cat {paths[0]}; exit 2") as stream:
            time.sleep(0.5)  # the command has exited (status 2) before anything is read
            read.append(len(stream.read()))  # webdataset alone raises here and drops the bytes
    assert read == [size]
    records = list(tar_records(f"pipe:cat {paths[0]}; exit 2", "unreadable_shard"))
    assert isinstance(records[-1], Skip) and len(records) > 1  # the samples before the failure, then the skip


def _png_bytes():
    out = io.BytesIO()
    Image.new("RGB", (4, 4), (1, 2, 3)).save(out, format="PNG")
    return out.getvalue()


def test_decode_image_converts_modes_and_squashes_the_whole_picture():
    assert decode_image(encoded_png := _png_bytes(), 4).dtype == torch.uint8 and len(encoded_png) > 0

    def decode(data, size):
        return to_unit_range(decode_image(data, size))

    def encoded(image, fmt="PNG"):
        out = io.BytesIO()
        image.save(out, format=fmt)
        return out.getvalue()

    grey = decode(encoded(Image.new("L", (20, 20), 128)), 20)
    assert grey.shape == (3, 20, 20) and torch.allclose(grey, torch.full_like(grey, 128 / 255))
    transparent = decode(encoded(Image.new("RGBA", (8, 8), (255, 0, 0, 0))), 8)
    assert torch.equal(transparent, torch.ones(3, 8, 8))  # transparent pixels over white
    palette = Image.new("RGB", (8, 8), (0, 0, 255)).convert("P")
    assert torch.equal(decode(encoded(palette), 8)[:, 0, 0], torch.tensor([0.0, 0.0, 1.0]))
    # red | green | blue, 20 px each: the whole picture is resized to the square (as Emu's released inference does,
    # no crop), so all three stripes remain, a third of the width each
    stripes = np.zeros((20, 60, 3), np.uint8)
    stripes[:, :20, 0], stripes[:, 20:40, 1], stripes[:, 40:, 2] = 255, 255, 255
    squashed = decode(encoded(Image.fromarray(stripes)), 21)
    for channel, columns in ((0, slice(0, 5)), (1, slice(9, 12)), (2, slice(16, 21))):
        assert squashed[channel, :, columns].min() > 0.95 and squashed[:, :, columns].sum(0).max() < 1.1
    upscaled = decode(encoded(Image.fromarray(stripes), "WEBP"), 40)
    assert upscaled.shape == (3, 40, 40) and 0.0 <= upscaled.min() and upscaled.max() <= 1.0


def test_seeded_shuffle_is_deterministic(shards):
    _, paths = shards

    def read(seed):
        return list(ImageTextShards(paths, image_size=32, seed=seed, repeat=False))

    def ids(seed):
        return [s["id"] for s in read(seed)]

    assert ids(3) == ids(3)
    assert ids(3) != ids(4) and sorted(ids(3)) == sorted(ids(4)) == [f"{i:09d}" for i in range(NUM)]
    first_shard = [s["id"] for s in read(3) if s["url"] == paths[0]]
    assert first_shard != sorted(first_shard)  # shuffled within a shard too, not only the shard order
    again = ImageTextShards(paths, image_size=32, seed=3, repeat=True)
    stream = iter(again)
    two_passes = [next(stream)["id"] for _ in range(2 * NUM)]
    assert sorted(two_passes) == sorted(2 * ids(3)) and two_passes[:NUM] == ids(3)
    assert two_passes[NUM:] != ids(3)  # a new order each pass


def test_two_workers_read_each_sample_once(shards):
    _, paths = shards
    source = ImageTextShards(paths, image_size=32, seed=1, repeat=False)
    loader = DataLoader(source, batch_size=None, num_workers=2)
    assert sorted(s["id"] for s in loader) == [f"{i:09d}" for i in range(NUM)]


def test_datamodule_batches_train_the_model(shards, tiny_model):
    root, paths = shards
    missing = str(root / "missing.tar")
    dm = StreamingDataModule(
        ImageTextShards(shard_pattern(root, 3), image_size=16),
        val={"urls": [missing, *paths]},
        batch_size=4,
        sequencer=tiny_model.sequencer,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    assert batch["images"].shape == (4, 3, 16, 16) and batch["image_counts"].tolist() == [1, 1, 1, 1]
    assert (batch["input_ids"] == tiny_model.image_id).sum() == 4 * tiny_model.num_queries
    assert torch.isfinite(tiny_model.losses(batch)["loss"])
    val = list(dm.val_dataloader())  # one pass in order; the missing shard's skip rides in the first batch
    assert [b["id"][0] for b in val] == [f"{i:09d}" for i in range(0, NUM, 4)]
    assert sum(len(b["id"]) for b in val) == NUM
    assert batch_skips(val[0]) == {"pairs_val": Counter(unreadable_shard=1)} and batch_skips(val[1]) == {}
    assert StreamingDataModule(ImageTextShards(paths), sequencer=tiny_model.sequencer).val_dataloader() == []


def test_bad_arguments_are_named(shards):
    _, paths = shards
    with pytest.raises(ValueError, match="name no shard"):
        ImageTextShards([], image_size=32)
    with pytest.raises(ValueError, match="image_first_prob 1.5"):
        ImageTextShards(paths, image_size=32, image_first_prob=1.5)
    with pytest.raises(ValueError, match="image_size 0"):
        ImageTextShards(paths, image_size=0)


def test_training_logs_the_skipped_samples_per_source_and_reason(tmp_path, capsys):
    import lightning as L
    from conftest import make_model

    world16 = ShapesWorld(image_size=16)
    records = [shapesworld_pair_record(world16, "train", i, "png", None) for i in range(12)]
    records[1]["png"] = b"broken"
    records[5]["txt"] = b""
    url = write_shard(tmp_path / "00000.tar", records)
    model = make_model()
    dm = StreamingDataModule(ImageTextShards(url, image_size=16, shuffle_buffer=1), batch_size=10)
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0)  # fmt: skip
    trainer.fit(model, dm)
    # two passes over the shard's 12 samples (10 usable) in two batches of 10: each pass's skips counted once
    (accounting,) = [c for c in trainer.callbacks if type(c).__name__ == "DataAccounting"]
    assert accounting.skipped == {"pairs": {"corrupt_image": 2, "empty_caption": 2}}
    assert trainer.callback_metrics["data/skipped/pairs/corrupt_image"] == 2
    assert "pairs: 4 skipped (corrupt_image: 2, empty_caption: 2)" in capsys.readouterr().out
