"""A data position that survives a change of world size: each rank reads for fixed *virtual ranks*.

    loader = VirtualRankLoader(lambda rank, world: TokenShardLoader(spec, 8, rank=rank, world_size=world, ...),
                               rank=info.rank, world_size=info.world_size)
    ckpt.register_stateful("data", loader, scope="redistributed")   # dalle_ds.parallel.checkpoint

The shard loaders split the corpus over world_size x workers slots, so a saved position is only
valid for the world size that saved it (dalle_ds/data/loaders.py). A run fixes its number of
virtual ranks V when it starts: its world size. On W ranks, with V a multiple of W, rank r runs the
V / W loaders of virtual ranks r*V/W .. (r+1)*V/W - 1 (each a ShardLoader built for rank v of V)
and hands out their batches in turn. Whatever W is, the ranks together read the same V slot
streams, so every sample is read once per epoch, and with the global batch held
(``optim.global_batch_size``: W ranks accumulate V/W times the micro-batches of V ranks) each
update sees the samples it would have seen on V ranks. A resume on W ranks loads the positions of
all V virtual ranks saved by any world size (:meth:`load_rank_states`, the checkpoint's
"redistributed" scope) and keeps V. Costs: V/W loaders (and their workers) per rank after a
shrink. Not covered: W > V (a run that grows beyond the world size it started on) would need a
loader that can split one slot's remaining stream, i.e. seek to a shard and an offset inside it;
that is refused with an error rather than reading samples twice.
"""

from __future__ import annotations

from typing import Any, Callable, Iterator

LoaderFactory = Callable[[int, int], Any]  # (virtual rank, virtual world size) -> a ShardLoader


class VirtualRankLoader:
    """Batches of this rank's virtual ranks, in turn (see the module docstring)."""

    def __init__(self, make: LoaderFactory, rank: int, world_size: int, virtual_ranks: int | None = None):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank={rank}, world_size={world_size}: need 0 <= rank < world_size")
        self.make, self.rank, self.world_size = make, rank, world_size
        self._build(world_size if virtual_ranks is None else virtual_ranks)

    def _build(self, virtual_ranks: int) -> None:
        if virtual_ranks < self.world_size or virtual_ranks % self.world_size:
            raise ValueError(f"data position of {virtual_ranks} virtual ranks (the world size the run started "
                             f"on) cannot be split over {self.world_size} ranks: the world size must divide it "
                             f"(a run cannot grow beyond its first world size and keep its data exactly-once)")
        self.virtual_ranks = virtual_ranks
        per_rank = virtual_ranks // self.world_size
        self.mine = list(range(self.rank * per_rank, (self.rank + 1) * per_rank))
        self.loaders = {v: self.make(v, virtual_ranks) for v in self.mine}
        self._next = 0  # index into self.mine of the loader that serves the next batch

    # what the trainer reads of a loader
    @property
    def urls(self) -> list[str]:
        return self.loaders[self.mine[0]].urls

    @property
    def tokenizer(self) -> Any:
        return self.loaders[self.mine[0]].tokenizer

    def __iter__(self) -> Iterator[dict[str, Any]]:
        its = {v: iter(self.loaders[v]) for v in self.mine}
        while its:
            v = self.mine[self._next]
            self._next = (self._next + 1) % len(self.mine)
            if v not in its:
                continue
            try:
                batch = next(its[v])
            except StopIteration:  # finite loaders: the others go on
                del its[v]
                continue
            yield batch

    def state_dict(self) -> dict[str, Any]:
        return {"virtual_ranks": self.virtual_ranks, "next": self._next,
                "loaders": {v: self.loaders[v].state_dict() for v in self.mine}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """This rank's own saved state (the same world size)."""
        self._load([state], int(state["next"]))

    def load_rank_states(self, states: list[dict[str, Any]]) -> None:
        """Every saved rank's state, in old rank order, from any world size that divides the number of
        virtual ranks: each of this rank's virtual ranks continues from whichever rank held it."""
        same_split = len(states) == self.world_size  # then this rank holds what old rank `rank` held
        self._load(states, int(states[self.rank]["next"]) if same_split else 0)

    def _load(self, states: list[dict[str, Any]], next_index: int) -> None:
        sizes = {int(s["virtual_ranks"]) for s in states}
        if len(sizes) != 1:
            raise ValueError(f"data states disagree on the number of virtual ranks: {sorted(sizes)}")
        virtual_ranks = sizes.pop()
        if virtual_ranks != self.virtual_ranks:
            self._build(virtual_ranks)
        positions = {int(v): s for state in states for v, s in state["loaders"].items()}
        missing = [v for v in self.mine if v not in positions]
        if missing:
            raise ValueError(f"the saved data states hold no position for virtual ranks {missing} of {virtual_ranks}")
        for v in self.mine:
            self.loaders[v].load_state_dict(positions[v])
        self._next = next_index % len(self.mine)
