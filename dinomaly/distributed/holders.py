"""Who holds a Ray cluster's CPUs and GPUs, in words, for the errors of jobs that cannot get theirs.

With Ray's State API (it needs the dashboard): Serve apps ("Serve app 'tiny' (2 replicas, 1 CPU)"), actors
("actor Holder (3 CPU)") and placement groups with the actors in them. Without it: placement groups, the Serve
apps of this process, and what is left as one unnamed amount. Naming never raises: the numbers are the finding.
"""

from __future__ import annotations

import logging
import sys

logger = logging.getLogger(__name__)
STATE_API_TIMEOUT_S = 5
PROBE_PREFIX = "dinomaly-resource-wait-"  # placement groups that only probe for free resources: never holders
EPS = 1e-6
_IGNORED = ("memory", "object_store_memory")


def amounts(resources: dict[str, float]) -> str:
    """{'CPU': 2.0, 'GPU': 0.5} -> '2 CPU, 0.5 GPU' (zero amounts left out; '0 CPU' when nothing)."""
    parts = [f"{number_text(v)} {k}" for k, v in resources.items() if abs(v) > EPS and counted(k)]
    return ", ".join(parts) or "0 CPU"


def number_text(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".")


def counted(key: str) -> bool:
    """CPU, GPU and custom resources; not memory, node markers or placement-group-internal names."""
    return (key not in _IGNORED and not key.startswith(("node:", "accelerator_type:", "bundle_group"))
            and "_group_" not in key)


def holders() -> list[str]:
    """What holds the cluster's CPUs/GPUs now, in words; never raises.

    With Ray's State API (it needs the dashboard): Serve apps ("Serve app 'tiny' (2 replicas, 1 CPU)"),
    actors ("actor Holder (3 CPU)") and placement groups with the actors in them. Without it: placement
    groups and Serve apps (when this process uses Serve), and a note that actor names are unavailable.
    """
    try:
        import ray

        if not ray.is_initialized():
            return []
    except Exception:  # noqa: BLE001
        return []
    try:
        return _with_state_api()
    except Exception as err:  # noqa: BLE001 - no dashboard, or it answered for another cluster
        logger.debug("Ray State API unavailable (%s); naming holders without it", err)
    try:
        return _without_state_api()
    except Exception as err:  # noqa: BLE001 - naming is best effort; the numbers are the finding
        return [f"(holders unknown: {type(err).__name__}: {err})"]


def _held() -> dict[str, float]:
    import ray

    total, free = ray.cluster_resources(), ray.available_resources()
    return {k: v - free.get(k, 0.0) for k, v in total.items() if counted(k) and v - free.get(k, 0.0) > EPS}


def _add(into: dict[str, float], resources: dict[str, float]) -> None:
    for key, value in resources.items():
        if counted(key):
            into[key] = into.get(key, 0.0) + float(value)


def _rest(held: dict[str, float], named: dict[str, float], who: str) -> list[str]:
    rest = {k: v - named.get(k, 0.0) for k, v in held.items() if v - named.get(k, 0.0) > 1e-3}
    return [f"{who} ({amounts(rest)})"] if rest else []


def _with_state_api() -> list[str]:
    import ray
    from ray.util.state import list_actors, list_placement_groups

    # The address of *this* cluster: without it the State API looks for any local Ray and may pick another.
    address = ray.get_runtime_context().gcs_address
    ours = {n["NodeID"] for n in ray.nodes()}
    options = dict(address=address, detail=True, limit=10_000, timeout=STATE_API_TIMEOUT_S,
                   raise_on_missing_output=False)
    actors = list_actors(filters=[("state", "=", "ALIVE")], **options)
    groups = list_placement_groups(filters=[("state", "=", "CREATED")], **options)
    mine_actors = [a for a in actors if a.node_id in ours]
    mine_groups = [g for g in groups if any(b.get("node_id") in ours for b in g.bundles or [])]
    if (actors or groups) and not (mine_actors or mine_groups):
        raise ConnectionError("the State API answered for another Ray cluster")
    lines, named = [], {}
    members: dict[str, dict[str, int]] = {}
    apps: dict[str, tuple[int, dict[str, float]]] = {}
    plain: dict[str, tuple[int, dict[str, float]]] = {}
    for actor in mine_actors:
        cls = actor.class_name.rsplit(".", 1)[-1]  # 'make.<locals>.Holder' -> 'Holder'
        if actor.placement_group_id:
            group = members.setdefault(actor.placement_group_id, {})
            group[cls] = group.get(cls, 0) + 1
            continue
        resources = {k: v for k, v in (actor.required_resources or {}).items() if counted(k)}
        if not resources:  # e.g. a default actor: 1 CPU to be scheduled, none held while it lives
            continue
        if actor.class_name.startswith("ServeReplica:"):
            key = actor.class_name.split(":")[1]
            table = apps
        else:
            key = cls + (f" '{actor.name}'" if actor.name else "")
            table = plain
        count, summed = table.get(key, (0, {}))
        _add(summed, resources)
        table[key] = (count + 1, summed)
        _add(named, resources)
    for app, (count, summed) in apps.items():
        lines.append((summed, f"Serve app '{app}' ({count} replica{'' if count == 1 else 's'}, {amounts(summed)})"))
    for group in mine_groups:
        if (group.name or "").startswith(PROBE_PREFIX):
            continue
        summed: dict[str, float] = {}
        for bundle in group.bundles or []:
            _add(summed, bundle.get("unit_resources") or {})
        _add(named, summed)
        inside = members.get(group.placement_group_id, {})
        who = ", ".join(f"{cls} x{n}" if n > 1 else cls for cls, n in inside.items()) or "no actors yet"
        label = f"'{group.name}'" if group.name else group.placement_group_id[:12]
        lines.append((summed, f"placement group {label} ({amounts(summed)}; {who})"))
    for key, (count, summed) in plain.items():
        lines.append((summed, f"actor {key}{f' x{count}' if count > 1 else ''} ({amounts(summed)})"))
    return _largest_first(lines) + _rest(_held(), named, "tasks")


def _largest_first(entries: list[tuple[dict[str, float], str]]) -> list[str]:
    """The lines of (resources, line) entries, biggest GPU then CPU holders first (stable otherwise)."""
    ranked = sorted(entries, key=lambda e: (-e[0].get("GPU", 0.0), -e[0].get("CPU", 0.0)))
    return [line for _, line in ranked]


def _without_state_api() -> list[str]:
    import ray

    lines, named = [], {}
    for info in ray.util.placement_group_table().values():
        if info.get("state") != "CREATED" or (info.get("name") or "").startswith(PROBE_PREFIX):
            continue
        summed: dict[str, float] = {}
        for bundle in (info.get("bundles") or {}).values():
            _add(summed, bundle)
        _add(named, summed)
        label = f"'{info['name']}'" if info.get("name") else info["placement_group_id"][:12]
        lines.append((summed, f"placement group {label} ({amounts(summed)})"))
    if "ray.serve" in sys.modules:  # only ask a Serve this process already uses: never start one
        from ray import serve

        for app, status in serve.status().applications.items():
            count = sum(n for d in status.deployments.values() for state, n in d.replica_states.items()
                        if state in ("RUNNING", "STARTING", "UPDATING", "RECOVERING"))
            lines.append(({}, f"Serve app '{app}' ({count} replica{'' if count == 1 else 's'})"))
    return _largest_first(lines) + _rest(_held(), named, "actors or tasks whose names are unavailable without Ray's State API "
                                         "(start Ray with the dashboard to see them)")
