"""Near-duplicate search that stays fast at a million items.

:class:`NearestIndex` answers "which vector added so far is most similar to this one" for
unit-length embeddings (cosine similarity). Small sets are searched exactly (one matrix
product, on one BLAS thread: the products are too small to gain from more, and extra
threads only contend); past ``exact_limit`` vectors the set moves into an HNSW graph from
``usearch`` (single-threaded inserts in a fixed order, so a rebuild from the same vectors in
the same order answers the same: a resumed run decides as the first one did). The graph
holds a fixed random projection of the vectors to 64 dimensions and its candidates are
rescored on the full vectors, stored as float16 (1M 1024-d vectors in ~2 GB). Searches
then cost about log(n) instead of n. ``method="exact"`` keeps exact search at any size;
``"ann"`` uses the graph from the first vector.

With ``background=True`` (an index that grows while it is searched) the graph lives in a
child process, and a batch added is searched exactly by the first search after it, then
goes into the graph there, while the caller works on that search's answers. Answers then
follow the sequence of ``add_many`` calls (empty ones included) and of the first search
after each: a run that searches once between adds answers as one resumed from the same
adds (each add puts the batch before it into the graph).

:class:`HashIndex` finds a 64-bit perceptual hash within ``bits`` bits of an earlier one
by multi-index hashing: the hash is cut into m blocks, and two hashes that differ in at
most ``bits`` bits differ in at most ``bits // m`` bits on at least one block (pigeonhole),
so only the hashes whose block is that close are compared (m is chosen for the fewest
lookups at a million hashes). Exact: the same answers as a full scan.
"""

from __future__ import annotations

import math
import os
import pickle
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Any, Generic, Literal, TypeVar

import numpy as np

SearchMethod = Literal["auto", "exact", "ann"]
SEARCH_METHODS = ("auto", "exact", "ann")

# auto: exact search while (vectors x dimensions) stays below this (~1-4 ms per search).
EXACT_LIMIT_CELLS = 4_000_000
# HNSW parameters: graph degree, and candidate lists while inserting and searching. Wider
# lists find the true nearest neighbour more often, at a cost linear in their length.
CONNECTIVITY = 16
EXPANSION_ADD = 48
EXPANSION_SEARCH = 128
# Candidates an ANN search returns, rescored against the full vectors (several, since the
# projection ranks near neighbours only roughly).
ANN_K = 8
# The graph's vectors: a random projection of wider embeddings to this many dimensions.
# Measured on 100K planted queries (hashing embedder, 1024-d): 64 dimensions insert ~30 %
# faster than 128 and find the planted original of as many duplicates (98.6-99 % within
# the 8 candidates at a search width of 64, 99.4 % at 128).
ANN_DIM = 64
PROJECTION_SEED = 13
# Rows per block of stored full vectors.
BLOCK_ROWS = 65536
# A batch of at most this many rows waits for the next search or batch (searched exactly
# meanwhile) before it goes into the graph; a larger one goes in at once.
PENDING_ROWS = 4096


@contextmanager
def single_blas_thread() -> Iterator[None]:
    """Run BLAS on one thread: matrix-vector products of a few thousand rows finish before
    a thread pool wakes up, and several threads only contend (measured in bench/RESULTS.md)."""
    try:
        from threadpoolctl import threadpool_limits  # type: ignore[import-untyped]
    except ImportError:  # without threadpoolctl the products run as configured
        yield
        return
    with threadpool_limits(limits=1, user_api="blas"):
        yield


class _Graph:
    """The HNSW graph over the projected vectors, and the full vectors (float16) that its
    candidates are rescored on."""

    def __init__(self, dim: int) -> None:
        from usearch.index import Index

        self.dim = dim
        self.blocks: list[np.ndarray] = []
        self.projection: np.ndarray | None = None
        if dim > ANN_DIM:
            # Fixed seed: every run (and every resume) projects alike.
            rng = np.random.default_rng(PROJECTION_SEED)
            self.projection = rng.standard_normal((dim, ANN_DIM)).astype(np.float32)
        self.ann = Index(
            ndim=ANN_DIM if self.projection is not None else dim,
            metric="cos",
            dtype="f16",
            connectivity=CONNECTIVITY,
            expansion_add=EXPANSION_ADD,
            expansion_search=EXPANSION_SEARCH,
        )

    def _project(self, vectors: np.ndarray) -> np.ndarray:
        vectors = vectors.astype(np.float32)
        projected = vectors if self.projection is None else vectors @ self.projection
        return np.ascontiguousarray(projected, dtype=np.float32)

    def insert(self, first: int, vectors: np.ndarray) -> None:
        """Add ``vectors`` (float16) at positions ``first``, ``first + 1``, ..."""
        # Fixed-size blocks: growing never copies what is stored (no transient doubling).
        done = 0
        while done < len(vectors):
            block, row = divmod(first + done, BLOCK_ROWS)
            if block == len(self.blocks):
                self.blocks.append(np.zeros((BLOCK_ROWS, self.dim), dtype=np.float16))
            take = min(BLOCK_ROWS - row, len(vectors) - done)
            self.blocks[block][row : row + take] = vectors[done : done + take]
            done += take
        keys = np.arange(first, first + len(vectors), dtype=np.uint64)
        # One thread: inserted in order, so the same vectors make the same graph every time.
        self.ann.add(keys, self._project(vectors), threads=1)

    def search(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row, the best of the ``ANN_K`` candidates, rescored on the full vectors:
        ``(similarities, positions)``, ``0.0`` and ``-1`` while the graph is empty."""
        rows = len(vectors)
        if len(self.ann) == 0:
            return np.zeros(rows, dtype=np.float32), np.full(rows, -1, dtype=np.int64)
        k = min(ANN_K, len(self.ann))
        matches = self.ann.search(self._project(vectors), k, threads=0)
        # One query comes back as Matches, several as BatchMatches (with counts per row).
        counts = getattr(matches, "counts", None)
        counts = np.asarray([len(matches.keys)] if counts is None else counts).reshape(rows, 1)
        found = np.arange(k)[None, :] < counts
        keys = np.asarray(matches.keys, dtype=np.int64).reshape(rows, -1)[:, :k]
        if keys.shape[1] < k:
            keys = np.pad(keys, ((0, 0), (0, k - keys.shape[1])))
        keys = np.where(found, keys, 0)
        gathered = np.empty((rows * k, self.dim), dtype=np.float16)
        flat = keys.reshape(-1)
        for block in np.unique(flat // BLOCK_ROWS):
            mask = flat // BLOCK_ROWS == block
            gathered[mask] = self.blocks[int(block)][flat[mask] % BLOCK_ROWS]
        sims = np.einsum(
            "rkd,rd->rk", gathered.reshape(rows, k, self.dim).astype(np.float32), vectors
        )
        sims = np.where(found, sims, -np.inf)
        # Highest similarity first (to 6 decimals); the earliest added wins a tie.
        order = np.lexsort((keys, -np.round(sims, 6)), axis=-1)[:, 0]
        picked = np.arange(rows)
        best_sims = sims[picked, order].astype(np.float32)
        best_keys = keys[picked, order]
        none = ~found.any(axis=1)
        best_sims[none], best_keys[none] = 0.0, -1
        return best_sims, best_keys

    def close(self) -> None:
        pass


class _GraphProcess:
    """A :class:`_Graph` in a child process, so that an insert runs there, on a core of its
    own, while this process goes on (usearch takes the GIL back after every vector, so a
    thread would wait on the caller's Python work). Messages are pickled over the child's
    stdin and stdout; the child answers searches only, in the order it was sent work, and
    exits when its stdin closes (this process ending, killed or not, included)."""

    def __init__(self, dim: int) -> None:
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
            # one BLAS thread: the same projections as in this process
            "OPENBLAS_NUM_THREADS": "1",
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
        }
        code = f"from tracetune.synth.mtrace.neardup import serve_graph; serve_graph({dim})"
        self._process = subprocess.Popen(
            [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env
        )

    def _send(self, message: tuple[Any, ...]) -> None:
        stdin = self._process.stdin
        assert stdin is not None
        try:
            pickle.dump(message, stdin, protocol=5)
            stdin.flush()
        except (BrokenPipeError, OSError):
            raise self._gone() from None

    def _gone(self) -> RuntimeError:
        code = self._process.wait()
        return RuntimeError(
            f"the near-duplicate search process ended unexpectedly (exit code {code}; "
            "killed for memory?); rerun the command to resume from the last finished block"
        )

    def insert(self, first: int, vectors: np.ndarray) -> None:
        self._send(("insert", first, vectors))

    def search(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        self._send(("search", vectors))
        stdout = self._process.stdout
        assert stdout is not None
        try:
            reply = pickle.load(stdout)
        except (EOFError, OSError, pickle.UnpicklingError):
            raise self._gone() from None
        if reply[0] != "ok":
            raise RuntimeError(f"near-duplicate search failed in its process: {reply[1]}")
        return reply[1], reply[2]

    def close(self) -> None:
        if self._process.poll() is None:
            with suppress(OSError):
                self._send(("close",))
        for stream in (self._process.stdin, self._process.stdout):
            if stream is not None:
                with suppress(OSError):
                    stream.close()
        try:
            self._process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()


def serve_graph(dim: int) -> None:
    """The child side of :class:`_GraphProcess`: a graph, fed over stdin until it closes."""
    reader = sys.stdin.buffer
    writer = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints go to stderr, never into the replies
    graph = _Graph(dim)
    failed: str | None = None
    while True:
        try:
            message = pickle.load(reader)
        except EOFError:
            return
        if message[0] == "close":
            return
        try:
            if failed is not None:
                raise RuntimeError(failed)
            if message[0] == "insert":
                graph.insert(message[1], message[2])
                continue
            reply: tuple[Any, ...] = ("ok", *graph.search(message[1]))
        except Exception as error:  # reported with the next search's answer
            failed = failed or f"{type(error).__name__}: {error}"
            if message[0] == "insert":
                continue
            reply = ("error", failed)
        pickle.dump(reply, writer, protocol=5)
        writer.flush()


class NearestIndex:
    """The most similar of the unit vectors added so far (cosine), exact or approximate.

    Approximate search walks an HNSW graph over a fixed random projection of the vectors to
    ``ANN_DIM`` dimensions (cheap distances), then rescores the ``ANN_K`` candidates it
    returns against the full vectors (kept as float16), so the reported similarity is the
    full embedding's, not the projection's. With ``background=True`` the graph lives in a
    child process, where each batch's insert overlaps the caller's work after the first
    search that follows it (see the module's notes); :meth:`close` ends that process.
    """

    def __init__(
        self,
        dim: int,
        method: SearchMethod = "auto",
        exact_limit: int | None = None,
        background: bool = False,
    ) -> None:
        if method not in SEARCH_METHODS:
            raise ValueError(f"unknown search method {method!r}; choose one of {SEARCH_METHODS}")
        self.dim = dim
        self.method = method
        self.background = background
        self.exact_limit = (
            exact_limit if exact_limit is not None else max(1, EXACT_LIMIT_CELLS // max(1, dim))
        )
        self._matrix = np.zeros((16, dim), dtype=np.float32)
        self._count = 0
        self._graph: _Graph | _GraphProcess | None = None
        # In the background: the latest batch (its first position, float16 rows), searched
        # exactly until the first search after it, or the next batch, puts it into the graph.
        self._pending: tuple[int, np.ndarray] | None = None
        if method == "ann":
            self._graph = self._new_graph()

    def __len__(self) -> int:
        return self._count

    def __enter__(self) -> NearestIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def approximate(self) -> bool:
        return self._graph is not None

    def close(self) -> None:
        """End the graph's process, if it has one (searches after this fail)."""
        if self._graph is not None:
            self._graph.close()

    def _new_graph(self) -> _Graph | _GraphProcess:
        return _GraphProcess(self.dim) if self.background else _Graph(self.dim)

    def _flush(self) -> None:
        if self._pending is not None and self._graph is not None:
            (first, vectors), self._pending = self._pending, None
            self._graph.insert(first, vectors)

    def add(self, vector: np.ndarray) -> int:
        """Add one vector; returns its position (0, 1, 2, ... in the order added)."""
        position = self._count
        self.add_many(np.asarray(vector, dtype=np.float32).reshape(1, self.dim))
        return position

    def add_many(self, vectors: np.ndarray) -> None:
        """Add the rows of ``vectors`` in order (positions continue from ``len(self)``)."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        first = self._count
        if self._graph is not None:
            # An empty batch counts too: the batch before it goes into the graph.
            self._flush()
            if self.background and 0 < len(vectors) <= PENDING_ROWS:
                self._pending = (first, vectors.astype(np.float16))
            elif len(vectors):
                self._graph.insert(first, vectors.astype(np.float16))
        else:
            needed = first + len(vectors)
            if needed > len(self._matrix):
                grown = np.zeros((max(needed, 2 * len(self._matrix)), self.dim), np.float32)
                grown[:first] = self._matrix[:first]
                self._matrix = grown
            self._matrix[first:needed] = vectors
            if self.method == "auto" and needed > self.exact_limit:
                self._graph = self._new_graph()
                # in order: the same graph every time
                self._graph.insert(0, self._matrix[:needed].astype(np.float16))
                self._matrix = np.zeros((0, self.dim), dtype=np.float32)
        self._count += len(vectors)

    def nearest(self, vector: np.ndarray) -> tuple[float, int]:
        """``(similarity, position)`` of the most similar vector added; ``(0.0, -1)`` if none."""
        sims, positions = self.nearest_many(np.asarray(vector, np.float32).reshape(1, self.dim))
        return float(sims[0]), int(positions[0])

    def nearest_many(self, vectors: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """For each row of ``vectors``, the similarity and position of the most similar
        vector added (``0.0`` and ``-1`` while the index is empty). The earliest added wins
        a tie. Searches of one index state answer alike whatever the batch."""
        vectors = np.asarray(vectors, dtype=np.float32).reshape(-1, self.dim)
        rows = len(vectors)
        if self._count == 0 or rows == 0:
            return np.zeros(rows, dtype=np.float32), np.full(rows, -1, dtype=np.int64)
        if self._graph is None:
            sims = vectors @ self._matrix[: self._count].T
            best = sims.argmax(axis=1)  # the first maximum: the earliest added
            return sims[np.arange(rows), best], best.astype(np.int64)
        best_sims, best_keys = self._graph.search(vectors)
        if self._pending is not None:  # the latest batch, exactly; the graph wins a tie
            first, latest = self._pending
            sims = vectors @ latest.astype(np.float32).T
            inner = sims.argmax(axis=1)
            inner_sims = sims[np.arange(rows), inner]
            closer = (best_keys < 0) | (np.round(inner_sims, 6) > np.round(best_sims, 6))
            best_sims = np.where(closer, inner_sims, best_sims).astype(np.float32)
            best_keys = np.where(closer, inner + first, best_keys).astype(np.int64)
            self._flush()  # inserted while the caller works on these answers
        return best_sims, best_keys


T = TypeVar("T")

# The index is laid out for this many hashes (bucket sizes grow with it; any number works).
HASH_DESIGN_SIZE = 1_000_000


def _best_blocks(bits: int) -> int:
    """Blocks to cut a 64-bit hash into: fewest expected lookups and comparisons per search
    at HASH_DESIGN_SIZE hashes (bits 4: 3 blocks of ~21 bits, each looked up with its 21
    one-bit variants, against buckets of ~0.5 hashes)."""

    def cost(blocks: int) -> float:
        return _lookups(bits, blocks) * (1 + HASH_DESIGN_SIZE / 2 ** (64 // blocks))

    feasible = [b for b in range(1, 17) if _lookups(bits, b) <= MAX_LOOKUPS]
    return min(feasible or range(1, 17), key=cost)


# Past this many lookups per search (bits above ~12), a plain scan is used instead.
MAX_LOOKUPS = 5000


def _lookups(bits: int, blocks: int) -> int:
    wide, radius = -(-64 // blocks), bits // blocks
    return blocks * sum(math.comb(wide, k) for k in range(radius + 1))


class HashIndex(Generic[T]):
    """Finds an earlier 64-bit hash within ``bits`` bits of a new one (multi-index hashing).

    Answers exactly what a scan of every earlier hash in order would: the first hash added
    that lies within ``bits`` bits.
    """

    def __init__(self, bits: int) -> None:
        if not 0 <= bits <= 64:
            raise ValueError(f"bits must be within 0..64, got {bits}")
        self.bits = bits
        blocks = _best_blocks(bits)
        self.scan = _lookups(bits, blocks) > MAX_LOOKUPS
        # Some block differs in at most `radius` bits (pigeonhole: were every block off by
        # more, the hashes would differ in at least blocks * (radius + 1) > bits bits).
        self.radius = bits // blocks
        edges = [round(i * 64 / blocks) for i in range(blocks + 1)]
        self.spans = [(lo, hi - lo) for lo, hi in zip(edges, edges[1:], strict=False)]
        self.tables: list[dict[int, list[int]]] = [{} for _ in self.spans]
        self.codes: list[int] = []
        self.items: list[T] = []

    def __len__(self) -> int:
        return len(self.codes)

    def _variants(self, value: int, width: int) -> Iterator[int]:
        yield value
        if self.radius == 0:
            return
        frontier = [(value, -1)]
        for _ in range(self.radius):
            grown = []
            for v, last in frontier:
                for bit in range(last + 1, width):
                    flipped = v ^ (1 << bit)
                    grown.append((flipped, bit))
                    yield flipped
            frontier = grown

    def find(self, code: int) -> T | None:
        """The item of the first hash added within ``bits`` bits of ``code``, else None."""
        if self.scan:  # so loose a match that enumerating block variants costs more
            for i, earlier in enumerate(self.codes):
                if (earlier ^ code).bit_count() <= self.bits:
                    return self.items[i]
            return None
        best = -1
        for table, (lo, width) in zip(self.tables, self.spans, strict=True):
            value = (code >> lo) & ((1 << width) - 1)
            for key in self._variants(value, width):
                for i in table.get(key, ()):
                    if best >= 0 and i >= best:
                        break  # positions ascend: no earlier match in this bucket
                    if (self.codes[i] ^ code).bit_count() <= self.bits:
                        best = i
                        break
        return self.items[best] if best >= 0 else None

    def add(self, code: int, item: T) -> None:
        position = len(self.codes)
        for table, (lo, width) in zip(self.tables, self.spans, strict=True):
            table.setdefault((code >> lo) & ((1 << width) - 1), []).append(position)
        self.codes.append(code)
        self.items.append(item)
