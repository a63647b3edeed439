from collections import Counter

import pytest
from torch.utils.data import DataLoader, Dataset, get_worker_info

from emu_lightning.cli import cli
from emu_lightning.data.mixture import MapStyleSource, MixedStream, MixtureDataModule
from emu_lightning.data.modules import EmuDataModule, StreamingDataModule
from emu_lightning.data.streaming import DataSourceError, Skip, StreamingSource, distributed_rank
from emu_lightning.sequence import SequenceBuilder
from emu_lightning.shapesworld import ShapesWorldDataModule


def reader():
    """The (rank, worker) of the process reading."""
    info = get_worker_info()
    return distributed_rank()[0], info.id if info is not None else 0


class Shards(StreamingSource):
    """``num_units`` shards of ``per_unit`` samples, each recording its shard and the process that read it."""

    def __init__(self, name, num_units=8, per_unit=5, broken=False, **kwargs):
        super().__init__(name, **kwargs)
        self.num_units, self.per_unit, self.broken = num_units, per_unit, broken

    def units(self):
        return list(range(self.num_units))

    def read(self, unit, rng):
        for k in range(self.per_unit):
            if self.broken:
                yield Skip("corrupt", f"{unit}/{k}")
            else:
                shard = f"{self.name}/{unit}"
                yield {"items": [f"{self.name} {unit} {k}"], "id": f"{shard}/{k}", "shard": shard, "reader": reader()}


class Indexed(Dataset):
    """A map-style dataset of ``size`` samples, each recording the process that read it."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def __getitem__(self, index):
        return {"items": ["x"], "id": f"indexed/{index}", "shard": f"indexed/{index}", "reader": reader()}


class ShardsModule(StreamingDataModule):
    """A StreamingDataModule over :class:`Shards` (its held-out reader: 2 shards), recording its hook calls."""

    def __init__(self, name, num_units=8, broken=False, has_val=True, batch_size=2, num_workers=0, sequencer=None):
        reader = Shards(name, num_units, broken=broken)
        val = {"num_units": 2} if has_val else None
        super().__init__(reader, val=val, batch_size=batch_size, num_workers=num_workers, sequencer=sequencer)
        self.calls = []

    def prepare_data(self):
        self.calls.append("prepare_data")
        super().prepare_data()

    def setup(self, stage=None):
        self.calls.append(f"setup {stage}")
        super().setup(stage)


@pytest.fixture
def sequencer(tokenizer):
    return SequenceBuilder(tokenizer, num_queries=2, max_length=32)


def take(stream, n):
    it = iter(stream)
    return [next(it) for _ in range(n)]


def test_ratios_are_followed_and_seeded():
    def streams():  # fresh readers: iterating a reader again continues with new passes
        return {name: Shards(name) for name in "abc"}

    ratios = {"a": 6, "b": 3, "c": 1}  # normalised to 0.6 / 0.3 / 0.1
    draws = take(MixedStream(streams(), ratios=ratios, seed=1), 4000)
    counts = Counter(s["source"] for s in draws)
    for name, p in (("a", 0.6), ("b", 0.3), ("c", 0.1)):
        assert abs(counts[name] / 4000 - p) < 0.03, counts
    ids = [s["id"] for s in draws[:200]]
    assert [s["id"] for s in take(MixedStream(streams(), ratios=ratios, seed=1), 200)] == ids
    assert [s["id"] for s in take(MixedStream(streams(), ratios=ratios, seed=2), 200)] != ids
    zero = take(MixedStream(streams(), ratios={"a": 1, "b": 1, "c": 0}), 200)
    assert {s["source"] for s in zero} == {"a", "b"}


def test_batch_sizes_are_exact_in_every_batch(sequencer):
    sources = {"pairs": ShardsModule("pairs"), "docs": ShardsModule("docs"), "video": ShardsModule("video")}
    dm = MixtureDataModule(sources, batch_sizes={"pairs": 4, "docs": 2, "video": 1}, sequencer=sequencer)
    assert dm.batch_size == 7
    batches = take(dm.train_dataloader(), 10)
    for batch in batches:
        assert batch["input_ids"].shape[0] == 7
        assert Counter(batch["source"]) == {"pairs": 4, "docs": 2, "video": 1}
    ids = [i for batch in batches for i in batch["id"]]
    assert len(set(ids)) == len(ids)  # each source advances through its own stream


def test_ratio_loader_collates_batches(sequencer):
    dm = MixtureDataModule({"a": ShardsModule("a"), "b": ShardsModule("b")}, ratios={"a": 1, "b": 1}, batch_size=5)
    dm.sequencer = sequencer
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape[0] == 5 and set(batch["source"]) <= {"a", "b"}


@pytest.mark.parametrize("batched", [False, True])
def test_two_ranks_two_workers_read_disjoint_shards_covering_everything(monkeypatch, batched):
    monkeypatch.setenv("WORLD_SIZE", "2")
    seen = {}
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        streams = {
            "a": Shards("a", num_units=8, per_unit=3, repeat=False),
            "b": Shards("b", num_units=6, per_unit=2, repeat=False),
            "indexed": MapStyleSource(Indexed(12), "indexed", repeat=False),
        }
        weights = {"a": 2, "b": 1, "indexed": 1}
        mixed = MixedStream(streams, **{"batch_sizes" if batched else "ratios": weights})
        for item in DataLoader(mixed, batch_size=None, num_workers=2, collate_fn=lambda x: x):
            for sample in item if batched else [item]:
                assert sample["reader"][0] == rank and sample["id"] not in seen, sample
                seen[sample["id"]] = sample
    everything = [f"a/{u}/{k}" for u in range(8) for k in range(3)] + [f"b/{u}/{k}" for u in range(6) for k in range(2)]
    assert sorted(seen) == sorted(everything + [f"indexed/{i}" for i in range(12)])
    shards = {}
    for sample in seen.values():
        shards.setdefault(sample["reader"], set()).add(sample["shard"])
    assert sorted(shards) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert shards[(1, 0)] == {"a/1", "a/5", "b/1", "b/5", "indexed/1", "indexed/5", "indexed/9"}
    assert shards[(0, 1)] == {"a/2", "a/6", "b/2", "indexed/2", "indexed/6", "indexed/10"}


def test_map_style_source_splits_indices_and_reshuffles_each_pass(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    parts = []
    for rank in range(2):
        monkeypatch.setenv("RANK", str(rank))
        indices = [int(s["id"].split("/")[1]) for s in take(MapStyleSource(Indexed(10), "indexed", seed=3), 10)]
        first, second = indices[:5], indices[5:]
        assert sorted(first) == sorted(second) and first != second
        assert indices == [int(s["id"].split("/")[1]) for s in take(MapStyleSource(Indexed(10), "x", seed=3), 10)]
        parts.append(set(first))
    assert parts[0].isdisjoint(parts[1]) and parts[0] | parts[1] == set(range(10))


def test_children_are_prepared_set_up_and_validated(sequencer):
    children = {"train-only": ShardsModule("t", has_val=False), "held": ShardsModule("h")}
    dm = MixtureDataModule(children, ratios={"train-only": 1, "held": 0}, sequencer=sequencer)
    dm.prepare_data()
    dm.setup("fit")
    assert all(child.calls == ["prepare_data", "setup fit"] for child in children.values())
    assert children["held"].sequencer is sequencer
    batches = list(dm.val_dataloader())
    assert [s for batch in batches for s in batch["source"]] == ["h_val"] * 10
    world = MixtureDataModule({"w": ShapesWorldDataModule(image_size=16, val_size=4)}, ratios={"w": 1})
    world.sequencer = sequencer
    batch = next(iter(world.val_dataloader()))
    assert batch["images"].shape == (4, 3, 16, 16)
    with pytest.raises(ValueError, match="val_source 'train-only'.*no validation loader"):
        MixtureDataModule(
            children, ratios={"train-only": 1, "held": 1}, val_source="train-only", sequencer=sequencer
        ).val_dataloader()


def test_bad_mixtures_fail_clearly(monkeypatch, sequencer):
    two = {"a": ShardsModule("a"), "b": ShardsModule("b")}
    with pytest.raises(ValueError, match="exactly one of `ratios` and `batch_sizes`"):
        MixtureDataModule(two)
    with pytest.raises(ValueError, match="exactly one"):
        MixtureDataModule(two, ratios={"a": 1, "b": 1}, batch_sizes={"a": 1, "b": 1})
    with pytest.raises(ValueError, match=r"ratios name unknown sources \['c'\]"):
        MixtureDataModule(two, ratios={"a": 1, "b": 1, "c": 1})
    with pytest.raises(ValueError, match=r"batch_sizes lack sources \['b'\]"):
        MixtureDataModule(two, batch_sizes={"a": 4})
    with pytest.raises(ValueError, match=r"ratios \{'b': -1\} must not be negative"):
        MixtureDataModule(two, ratios={"a": 1, "b": -1})
    with pytest.raises(ValueError, match="must have a positive total"):
        MixtureDataModule(two, batch_sizes={"a": 0, "b": 0})
    with pytest.raises(ValueError, match="val_source 'c' is not one of the sources"):
        MixtureDataModule(two, ratios={"a": 1, "b": 1}, val_source="c")
    no_stream = MixtureDataModule({"x": EmuDataModule(2, 0, None)}, ratios={"x": 1}, sequencer=sequencer)
    with pytest.raises(ValueError, match="source 'x' \\(EmuDataModule\\) has no training stream"):
        no_stream.train_dataloader()
    broken = MixtureDataModule(
        {"a": ShardsModule("a"), "bad": ShardsModule("bad", broken=True)}, ratios={"a": 1, "bad": 1}
    )
    broken.sequencer = sequencer
    with pytest.raises(DataSourceError, match=r"source .bad.: none .* in 8 units .*40 skipped; corrupt: 40"):
        list(broken.train_dataloader())
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "2")
    one_shard = MixtureDataModule(
        {"a": ShardsModule("a"), "tiny": ShardsModule("tiny", num_units=1)},
        batch_sizes={"a": 1, "tiny": 1},
        sequencer=sequencer,
    )
    with pytest.raises(DataSourceError, match="source 'tiny': this process .* has no units to read: 1 units"):
        next(iter(one_shard.train_dataloader()))


def test_mixture_yaml_parses_through_the_cli(tmp_path, sequencer):
    config = tmp_path / "mixture.yaml"
    config.write_text(
        """
data:
  class_path: emu_lightning.data.mixture.MixtureDataModule
  init_args:
    batch_sizes: {captions: 3, questions: 1}
    seed: 7
    val_source: questions
    sources:
      captions:
        class_path: emu_lightning.shapesworld.ShapesWorldDataModule
        init_args: {image_size: 32, train_size: 50}
      questions:
        class_path: emu_lightning.shapesworld.ShapesWorldDataModule
        init_args: {image_size: 32, vqa_prob: 1.0, val_size: 8}
"""
    )
    args = ["--config", "configs/tiny.yaml", "--config", str(config), "--trainer.callbacks=[]"]
    args += ["--data.init_args.sources.captions.init_args.train_size=40", "--trainer.logger=false"]
    dm = cli(args, run=False).datamodule
    assert isinstance(dm, MixtureDataModule) and dm.batch_size == 4 and dm.seed == 7
    captions, questions = dm.sources["captions"], dm.sources["questions"]
    assert len(captions.train_set) == 40 and questions.train_set.vqa_prob == 1.0
    dm.sequencer = sequencer
    batch = next(iter(dm.train_dataloader()))
    assert Counter(batch["source"]) == {"captions": 3, "questions": 1}
    (val,) = dm.val_dataloader()  # the questions' held-out split, in one batch
    assert val["id"] == [f"val-{i}" for i in range(8)] and val["input_ids"].shape[0] == 8
