"""``--redis-url`` forms (SPEC §8), without Redis."""

from __future__ import annotations

import pytest

from gateway.redis_topology import RedisUrl


def test_the_three_topologies_and_their_parts() -> None:
    single = RedisUrl.parse("rediss://user:pw@cache:6380/2")
    assert (single.kind, single.url) == ("single", "rediss://user:pw@cache:6380/2")
    cluster = RedisUrl.parse("redis+cluster://u:p%40ss@10.0.0.1:7000,[::1]:7001,seed")
    assert cluster.kind == "cluster"
    assert cluster.hosts == (("10.0.0.1", 7000), ("::1", 7001), ("seed", 6379))
    assert (cluster.username, cluster.password, cluster.tls) == ("u", "p@ss", False)
    sentinel = RedisUrl.parse("redis+sentinel://:secret@s1,s2:26380/mymaster/3")
    assert sentinel.kind == "sentinel"
    assert sentinel.hosts == (("s1", 26379), ("s2", 26380))
    assert (sentinel.service, sentinel.db, sentinel.username, sentinel.password) == (
        "mymaster", 3, None, "secret")
    assert RedisUrl.parse("rediss+cluster://h:1").tls


@pytest.mark.parametrize("url", [
    "redis://:pw@h:1/0", "redis+cluster://u:pw@h:1", "redis+sentinel://u:pw@h:1/svc",
])
def test_described_urls_never_carry_credentials(url: str) -> None:
    assert "pw" not in RedisUrl.parse(url).describe()


@pytest.mark.parametrize("url", [
    "mongodb://h", "redis+cluster://", "redis+cluster://h:1/0", "redis+sentinel://h:1",
    "redis+sentinel://h:1/svc/x", "redis+cluster://h:port", "h:6379",
])
def test_unusable_urls_are_refused_with_a_message(url: str) -> None:
    with pytest.raises(ValueError):
        RedisUrl.parse(url)
