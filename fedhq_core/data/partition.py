"""Client partitioners: IID, Dirichlet(alpha) over labels with a minimum shard size, and k
classes per client. Each returns a list of index arrays, one per client, drawn from ``rng``."""
from __future__ import annotations

import numpy as np


def partition_iid(labels: np.ndarray, n_clients: int, rng: np.random.Generator) -> list[np.ndarray]:
    perm = rng.permutation(len(labels))
    return [np.sort(s) for s in np.array_split(perm, n_clients)]


def partition_dirichlet(labels: np.ndarray, n_clients: int, alpha: float, rng: np.random.Generator,
                        min_size: int = 10, max_tries: int = 100) -> list[np.ndarray]:
    """Label-skewed split: each class is spread over clients by Dirichlet(alpha) proportions.

    Redraws until every client holds at least ``min_size`` samples (the usual FedLab/FedML
    recipe); raises ValueError when that is impossible for the data size.
    """
    n = len(labels)
    if n_clients * min_size > n:
        raise ValueError(f"min_shard_size: {n_clients} clients x {min_size} exceeds {n} samples")
    classes = np.unique(labels)
    for _ in range(max_tries):
        shards: list[list[int]] = [[] for _ in range(n_clients)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(labels == c))
            p = rng.dirichlet(np.full(n_clients, alpha))
            cuts = (np.cumsum(p) * len(idx)).astype(int)[:-1]
            for k, part in enumerate(np.split(idx, cuts)):
                shards[k].extend(part.tolist())
        if min(len(s) for s in shards) >= min_size:
            return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]
    # Fall back: top up the smallest shards from the largest ones, keeping the label skew.
    shards_arr = [list(s) for s in shards]
    for k in range(n_clients):
        while len(shards_arr[k]) < min_size:
            donor = int(np.argmax([len(s) for s in shards_arr]))
            shards_arr[k].append(shards_arr[donor].pop())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards_arr]


def partition_kclass(labels: np.ndarray, n_clients: int, k: int, rng: np.random.Generator) -> list[np.ndarray]:
    """Each client holds ``k`` classes; each class's samples are split among its holders."""
    classes = np.unique(labels)
    k = min(k, len(classes))
    owned = [rng.choice(classes, size=k, replace=False) for _ in range(n_clients)]
    # Make sure every class has at least one holder so no data is silently dropped.
    for c in classes:
        if not any(c in o for o in owned):
            j = int(rng.integers(n_clients))
            owned[j][int(rng.integers(k))] = c
    shards: list[list[int]] = [[] for _ in range(n_clients)]
    for c in classes:
        holders = [j for j in range(n_clients) if c in owned[j]]
        idx = rng.permutation(np.flatnonzero(labels == c))
        for j, part in zip(holders, np.array_split(idx, len(holders))):
            shards[j].extend(part.tolist())
    return [np.sort(np.asarray(s, dtype=np.int64)) for s in shards]


def partition(labels: np.ndarray, n_clients: int, method: str, rng: np.random.Generator, *,
              alpha: float = 0.5, classes_per_client: int = 2, min_size: int = 10) -> list[np.ndarray]:
    if method == "iid":
        return partition_iid(labels, n_clients, rng)
    if method == "dirichlet":
        return partition_dirichlet(labels, n_clients, alpha, rng, min_size=min_size)
    if method == "kclass":
        return partition_kclass(labels, n_clients, classes_per_client, rng)
    raise ValueError(f"partition: unknown method {method!r}")
