"""Calling every shard at once, and what a failed call means for the round."""

from __future__ import annotations

from typing import Any

from fleet.round.shard import ShardCore, ShardStateLost


class ShardCrash(RuntimeError):
    """A shard actor died during a call, or was restarted (losing the round's state) between two."""


def call_all(shards: list[Any], method: str, args: list[tuple]) -> list[Any]:
    """Call `method` on every shard, in parallel for Ray actors, in turn for in-process shards."""
    if shards and isinstance(shards[0], ShardCore):
        try:
            return [getattr(s, method)(*a) for s, a in zip(shards, args, strict=True)]
        except ShardStateLost as e:
            raise ShardCrash(str(e)) from e
    import ray

    try:
        return ray.get([getattr(s, method).remote(*a) for s, a in zip(shards, args, strict=True)])
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
        raise ShardCrash(f"a shard died during {method}") from e
    except ray.exceptions.RayTaskError as e:
        if isinstance(e.cause, ShardStateLost):
            raise ShardCrash(str(e.cause)) from e
        raise
