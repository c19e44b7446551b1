"""The per-request router (server/router.py): features from real safetensors files and the
default tasks' real prompts, the preference rule, calibration files, and routing through the
Selector with a real store and adapter pool."""

from __future__ import annotations

import asyncio
import json
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from prometheus_client import CollectorRegistry
from safetensors.torch import save_file

from factories import random_factors, write_adapter
from loramerge.merge_engine import AdapterPool
from loramerge.server.config import MetricsSettings, RouterSettings, load_settings
from loramerge.server.defaults.tasks import TASKS
from loramerge.server.domain import MergeChoice, RouteChoice
from loramerge.server.errors import ConfigError, ConflictError, InvalidRequestError
from loramerge.server.metrics import Metrics
from loramerge.server.registry import AdapterRegistry
from loramerge.server.router import (
    CALIBRATION_FILE,
    Centroids,
    EmbeddingTable,
    NgramFeatures,
    RouteParams,
    Router,
    RouterError,
    build_router,
    on_step,
    routed_preference,
)
from loramerge.server.selection import Selector, route_params
from loramerge.server.store import SqliteStore
from loramerge.server.version_key import quantize_preference

CALIBRATION_SEED = 2002
NAMES = [task.name for task in TASKS]


def task_prompts(seed: int, n: int) -> dict[str, list[str]]:
    return {task.name: [e.prompt for e in task.examples(seed, n)] for task in TASKS}


# ----------------------------------------------------------------------------- the rule


def test_temperature_zero_picks_the_most_similar_adapter_the_prior_allows() -> None:
    assert routed_preference([0.1, 0.9, 0.5], [1, 1, 1], 0.0, 0.0) == (0.0, 1.0, 0.0)
    assert routed_preference([0.1, 0.9, 0.5], [1, 0, 1], 0.0, 0.0) == (0.0, 0.0, 1.0)


def test_preference_is_the_prior_times_the_softmax() -> None:
    sims, prior, t = [0.2, 0.5, -0.1], [2.0, 1.0, 1.0], 0.3
    expected = [p * math.exp(s / t) for s, p in zip(sims, prior, strict=True)]
    rho = routed_preference(sims, prior, t, 0.0)
    assert rho is not None
    assert rho == pytest.approx([w / sum(expected) for w in expected])


def test_min_weight_drops_small_weights_but_never_the_largest() -> None:
    rho = routed_preference([0.9, 0.8, 0.0], [1, 1, 1], 0.3, 0.1)
    assert rho is not None and rho[2] == 0.0 and rho[0] > rho[1] > 0
    assert math.fsum(rho) == pytest.approx(1.0)
    flat = routed_preference([0.0, 0.0, 0.0, 0.0], [1, 1, 1, 1], 1.0, 0.5)
    assert flat == (1.0, 0.0, 0.0, 0.0)  # all below 0.5: the first largest stays


def test_a_prior_without_routable_weight_abstains() -> None:
    assert routed_preference([0.3, 0.1], [0.0, 0.0], 0.1, 0.0) is None


def test_very_low_temperatures_do_not_overflow() -> None:
    rho = routed_preference([1.0, -1.0], [1.0, 1.0], 1e-6, 0.0)
    assert rho == (1.0, 0.0)


def test_on_step_stays_on_the_simplex_and_on_the_grid() -> None:
    rho = on_step((0.62, 0.33, 0.05), 0.1)
    assert math.fsum(rho) == pytest.approx(1.0)
    assert quantize_preference(rho, 0.1) == (6, 3, 1)
    # a grid point of a coarse step is a fixed point of the server's finer step
    assert quantize_preference(rho, 0.01) == (60, 30, 10)


def test_on_step_drops_softmax_tails_under_half_a_step() -> None:
    assert on_step((0.9999, 1e-4, 0.0), 0.1) == (1.0, 0.0, 0.0)
    assert on_step((0.04, 0.03, 0.03), 0.1)[0] == 1.0  # the largest always stays


# ----------------------------------------------------------------------------- features


def write_model(directory: Path, table: torch.Tensor, name: str = "model.embed_tokens.weight"):
    directory.mkdir(parents=True, exist_ok=True)
    other = torch.ones(3, 5)
    save_file({"lm_head.weight": other, name: table}, str(directory / "model.safetensors"))
    return directory


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_embedding_rows_are_read_from_the_safetensors_file(
    tmp_path: Path, dtype: torch.dtype
) -> None:
    table = torch.randn(50, 8, generator=torch.Generator().manual_seed(0)).to(dtype)
    embedding = EmbeddingTable(write_model(tmp_path, table))
    assert embedding.weight.shape == (50, 8)
    expected = table[[3, 7, 7, 49]].float().mean(dim=0)
    assert torch.equal(embedding.mean_rows([3, 7, 7, 49]), expected)
    assert torch.equal(embedding.mean_rows([]), torch.zeros(8))


def test_a_sharded_model_is_found_through_its_index(tmp_path: Path) -> None:
    table = torch.randn(20, 4)
    save_file({"model.embed_tokens.weight": table}, str(tmp_path / "model-00002.safetensors"))
    save_file({"lm_head.weight": torch.ones(2, 2)}, str(tmp_path / "model-00001.safetensors"))
    weight_map = {"model.embed_tokens.weight": "model-00002.safetensors",
                  "lm_head.weight": "model-00001.safetensors"}  # fmt: skip
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    assert torch.equal(EmbeddingTable(tmp_path).mean_rows([5]), table[5])


def test_a_model_without_an_embedding_is_named(tmp_path: Path) -> None:
    write_model(tmp_path, torch.ones(4, 4), name="encoder.something.weight")
    with pytest.raises(RouterError, match=str(tmp_path)):
        EmbeddingTable(tmp_path)


def test_ngram_features_ignore_case_and_spacing() -> None:
    features = NgramFeatures()
    rows = features(["What is 12 +  30?", "what IS 12 + 30?", "Reverse these words"])
    assert torch.equal(rows[0], rows[1])
    assert not torch.equal(rows[0], rows[2])


def test_centroids_route_the_default_tasks_held_out_prompts() -> None:
    features = NgramFeatures()
    centroids = Centroids.fit(features, task_prompts(CALIBRATION_SEED, 16))
    assert centroids.names == tuple(NAMES)
    for index, prompts in enumerate(task_prompts(1001, 10).values()):
        assert centroids.similarities(features(prompts)).argmax(dim=1).tolist() == [index] * 10


def test_every_adapter_counts_once_in_the_mean_whatever_its_prompts() -> None:
    features = NgramFeatures()
    prompts = task_prompts(CALIBRATION_SEED, 4)
    more = {**prompts, "add": prompts["add"] * 5}
    assert torch.allclose(Centroids.fit(features, prompts).mean, Centroids.fit(features, more).mean)


# ----------------------------------------------------------------------------- the server's router


@pytest.fixture
def task_pool(tmp_path: Path) -> AdapterPool:
    """One (random) adapter per default task, each directory holding its calibration prompts
    except `caesar`'s, whose prompts the configuration names."""
    prompts = task_prompts(CALIBRATION_SEED, 16)
    paths = []
    for seed, name in enumerate(NAMES):
        directory = write_adapter(tmp_path / "adapters" / name, random_factors(seed))
        target = directory / CALIBRATION_FILE if name != "caesar" else tmp_path / "caesar.txt"
        target.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts[name]))
        paths.append(directory)
    return AdapterPool.load(paths)


def make_router(tmp_path: Path, **settings: object) -> Router:
    config = RouterSettings(
        features="ngram", calibration={"caesar": tmp_path / "caesar.txt"}, **settings
    )
    router = build_router(config, tmp_path, lambda: None)
    assert router is not None
    return router


PARAMS = RouteParams(temperature=0.05, min_weight=0.0, step=0.1)


def test_router_reads_calibration_from_adapter_directories_and_the_config(
    tmp_path: Path, task_pool: AdapterPool
) -> None:
    router = make_router(tmp_path)
    for name, prompts in task_prompts(1001, 3).items():
        for prompt in prompts:
            route = router.route(task_pool, prompt, None, PARAMS)
            assert route.rho is not None
            assert max(range(4), key=lambda i: route.rho[i]) == task_pool.names.index(name)  # type: ignore[index]


def test_routed_preferences_are_on_the_router_step(tmp_path: Path, task_pool: AdapterPool) -> None:
    router = make_router(tmp_path)
    params = RouteParams(temperature=10.0, min_weight=0.0, step=0.25)  # nearly uniform
    route = router.route(task_pool, "What is 10 + 20?", None, params)
    assert route.rho == (0.25, 0.25, 0.25, 0.25)


def test_an_adapter_without_calibration_prompts_is_never_routed_to(
    tmp_path: Path, task_pool: AdapterPool
) -> None:
    (task_pool.adapter("add").path / CALIBRATION_FILE).unlink()
    router = make_router(tmp_path)
    route = router.route(task_pool, "What is 41 + 17?", None, PARAMS)
    assert route.routable == ("caesar", "date", "reverse")  # pool order (sorted names)
    assert route.rho is not None and route.rho[task_pool.names.index("add")] == 0.0


def test_the_prior_restricts_and_weights_the_route(tmp_path: Path, task_pool: AdapterPool) -> None:
    router = make_router(tmp_path)
    assert task_pool.names == ("add", "caesar", "date", "reverse")
    route = router.route(task_pool, "What is 41 + 17?", [0.0, 0.5, 0.5, 0.0], PARAMS)
    assert route.rho is not None and route.rho[0] == 0.0 and route.rho[3] == 0.0
    only_add = router.route(task_pool, "Reverse: a b", [1.0, 0.0, 0.0, 0.0], PARAMS)
    assert only_add.rho == (1.0, 0.0, 0.0, 0.0)


def test_a_malformed_calibration_file_is_named_with_its_line(
    tmp_path: Path, task_pool: AdapterPool
) -> None:
    (task_pool.adapter("date").path / CALIBRATION_FILE).write_text('{"prompt": "ok"}\n{oops\n')
    router = make_router(tmp_path)
    with pytest.raises(RouterError, match=rf"'date'.*{CALIBRATION_FILE}:2: invalid JSON"):
        router.route(task_pool, "hi", None, PARAMS)


def test_a_missing_configured_calibration_file_fails_the_start(tmp_path: Path) -> None:
    config = RouterSettings(features="ngram", calibration={"add": tmp_path / "nope.jsonl"})
    with pytest.raises(ConfigError) as error:
        build_router(config, tmp_path, lambda: None)
    assert error.value.field == "router.calibration.add"
    assert "nope.jsonl" in str(error.value)


def test_embedding_features_need_an_embedding_in_the_model(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as error:
        build_router(RouterSettings(features="embedding"), tmp_path, lambda: None)
    assert error.value.field == "router.features"


def test_routing_off_builds_no_router(tmp_path: Path) -> None:
    assert build_router(RouterSettings(enabled=False), tmp_path, lambda: None) is None


# ----------------------------------------------------------------------------- through the Selector


@pytest.fixture
def selector_parts(
    tmp_path: Path, task_pool: AdapterPool
) -> Iterator[tuple[SqliteStore, AdapterRegistry, Metrics]]:
    store = SqliteStore(tmp_path / "s.db")
    registry = AdapterRegistry(store, [])
    registry.load_initial({name: task_pool.adapter(name).path for name in task_pool.names})
    yield store, registry, Metrics(MetricsSettings(), CollectorRegistry())
    store.close()


def make_selector(
    tmp_path: Path, parts: tuple[SqliteStore, AdapterRegistry, Metrics], enabled: bool = True
) -> Selector:
    store, registry, metrics = parts
    settings = load_settings(
        environ={},
        overrides={"router": {"features": "ngram", "preference_step": 0.1, "enabled": enabled,
                              "calibration": {"caesar": str(tmp_path / "caesar.txt")}}},
    )  # fmt: skip
    router = build_router(settings.router, tmp_path, lambda: None)
    return Selector(settings, store, registry, router, metrics)


ROUTE = MergeChoice(route=RouteChoice(enabled=True))


def outcomes(metrics: Metrics) -> dict[str, float]:
    return {
        sample.labels["outcome"]: sample.value
        for family in metrics.route_decisions.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_a_routed_request_without_a_preference_gets_its_task(
    tmp_path: Path, selector_parts
) -> None:  # type: ignore[no-untyped-def]
    selector = make_selector(tmp_path, selector_parts)
    prompt = TASKS[2].examples(1001, 1)[0].prompt
    selection = asyncio.run(selector.select("", {}, ROUTE, prompt))
    assert selection is not None and selection.route is not None
    assert max(zip(selection.rho, selection.pool.names, strict=True))[1] == TASKS[2].name
    assert outcomes(selector_parts[2])["routed"] == 1


def test_a_tenant_that_stored_routing_is_routed_and_can_turn_it_off(
    tmp_path: Path, selector_parts
) -> None:  # type: ignore[no-untyped-def]
    store = selector_parts[0]
    store.set_tenant("acme", {"add": 1, "reverse": 1}, ROUTE)
    selector = make_selector(tmp_path, selector_parts)
    prompt = next(t for t in TASKS if t.name == "reverse").examples(1001, 1)[0].prompt
    routed = asyncio.run(selector.select("acme", {}, MergeChoice(), prompt))  # add, ..., reverse
    assert routed is not None and routed.rho == (0.0, 0.0, 0.0, 1.0)
    off = MergeChoice(route=RouteChoice(enabled=False))
    static = asyncio.run(selector.select("acme", {}, off, prompt))
    assert static is not None and static.route is None and static.rho == (0.5, 0.0, 0.0, 0.5)


def test_requests_without_a_prompt_get_the_static_preference(
    tmp_path: Path, selector_parts
) -> None:  # type: ignore[no-untyped-def]
    selector_parts[0].set_tenant("acme", {"add": 1}, ROUTE)
    selector = make_selector(tmp_path, selector_parts)
    merged = asyncio.run(selector.select("acme", {}, MergeChoice()))
    assert merged is not None and merged.route is None and merged.rho == (1.0, 0.0, 0.0, 0.0)
    with pytest.raises(InvalidRequestError) as error:
        asyncio.run(selector.select("acme", {}, ROUTE))
    assert error.value.field == "merge.route.enabled"


def test_with_routing_off_a_request_asking_fails_and_a_tenant_falls_back(
    tmp_path: Path, selector_parts
) -> None:  # type: ignore[no-untyped-def]
    selector_parts[0].set_tenant("acme", {"date": 1}, ROUTE)
    selector = make_selector(tmp_path, selector_parts, enabled=False)
    with pytest.raises(ConflictError, match="not enabled"):
        asyncio.run(selector.select("", {}, ROUTE, "What is 1 + 2?"))
    served = asyncio.run(selector.select("acme", {}, MergeChoice(), "What is 1 + 2?"))
    assert served is not None and served.rho == (0.0, 0.0, 1.0, 0.0)
    assert outcomes(selector_parts[2])["unavailable"] == 1


@pytest.mark.parametrize(
    ("route", "field"),
    [
        (RouteChoice(enabled=True, temperature=-0.1), "merge.route.temperature"),
        (RouteChoice(enabled=True, temperature=11.0), "merge.route.temperature"),
        (RouteChoice(enabled=True, temperature=math.nan), "merge.route.temperature"),
        (RouteChoice(enabled=True, min_weight=0.6), "merge.route.min_weight"),
        (RouteChoice(enabled=False, min_weight=-1.0), "merge.route.min_weight"),
    ],
)
def test_route_parameters_out_of_range_name_the_field(route: RouteChoice, field: str) -> None:
    with pytest.raises(InvalidRequestError) as error:
        route_params(route, RouterSettings())
    assert error.value.field == field


def test_route_choice_survives_the_store_and_layers_field_by_field() -> None:
    stored = MergeChoice(method="ties", route=RouteChoice(enabled=True, temperature=0.2))
    assert MergeChoice.from_json(json.loads(json.dumps(stored.to_json()))) == stored
    assert MergeChoice.from_json(MergeChoice(method="ta").to_json()).route == RouteChoice()
    request = MergeChoice(route=RouteChoice(min_weight=0.1))
    assert request.over(stored).route == RouteChoice(True, 0.2, 0.1)


# ----------------------------------------------------------------------------- offline rules


def test_offline_rules_static_product_and_mixture(task_pool: AdapterPool) -> None:
    from loramerge.server.defaults.routed import DEFAULT_ROUTE, route_items

    prompts = [next(t for t in TASKS if t.name == "add").examples(1001, 1)[0].prompt]
    route = dict(DEFAULT_ROUTE) | {"features": "ngram", "prior": (("add", 1.0), ("date", 1.0))}
    names = task_pool.names  # add, caesar, date, reverse
    static = route_items(task_pool, Path("."), route | {"rule": "static"}, prompts)
    assert static == [(0.5, 0.0, 0.5, 0.0)]
    (product,) = route_items(task_pool, Path("."), route | {"rule": "product"}, prompts)
    assert product[names.index("add")] >= 0.9 and product[names.index("caesar")] == 0.0
    (mixture,) = route_items(task_pool, Path("."), route | {"rule": "mixture"}, prompts)
    assert mixture[names.index("date")] >= 0.2  # half of the prior's 0.5 always stays
