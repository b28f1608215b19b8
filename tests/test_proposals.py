"""Budget-exact proposals: every proposal within budget and on its share of it, warm starts solved
to the budget, the inverse, old space files, and the calibration of mass-based SaiT."""

import functools
import math

import optuna
import pytest
import torch

from autoprune import PruneConfig, count_flops, predict_flops
from autoprune.patch import apply
from autoprune.search.calibration import Calibration
from autoprune.search.proposals import Proposer, ProposalError, Replay, cheapest_cost
from autoprune.search.solve import keep_rate_family, removal_family, solve
from autoprune.search.space import Candidate, Fixed, Range, SearchSpace, SpaceError
from autoprune.search.warm_start import hand_designed, warm_start_params
from autoprune.trial import create_unweighted

MODELS = {  # a quickstart-like model (depth 6, 64 patches), the search tests' tiny one, DeiT-T's shapes
    "quick": ("vit_tiny_patch16_224", {"img_size": 64, "patch_size": 8, "embed_dim": 128, "depth": 6, "num_heads": 4}),
    "tiny": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 4, "num_heads": 3}),
    "deit": ("deit_tiny_patch16_224", {}),
}
REDUCERS = {"evit", "tome", "ppt", "tps", "bat", "sait"}


@functools.lru_cache(maxsize=None)
def model_and_calibration(key: str):
    torch.manual_seed(0)
    name, kwargs = MODELS[key]
    model = create_unweighted(name, kwargs).eval()
    size = model.patch_embed.img_size
    return model, Calibration(model, torch.randn(4, 3, *size))


def proposer_for(key: str, fraction: float, space: str | SearchSpace = "default") -> Proposer:
    model, calibration = model_and_calibration(key)

    def cost(cfg: PruneConfig) -> float:
        return calibration.flops(cfg) if cfg.adaptive else predict_flops(model, cfg)

    space = space if isinstance(space, SearchSpace) else SearchSpace.from_file(space)
    return Proposer(space, model, fraction * predict_flops(model), cost)


def check_solution(proposer: Proposer, candidate, solution, share: float) -> None:
    cost = proposer.cost(candidate.prune)
    assert cost == solution.cost <= proposer.limit, candidate.prune.describe()
    assert math.isclose(solution.target, min(proposer.limit, share * proposer.limit), rel_tol=1e-8)
    if solution.reached and solution.below is not None:
        # on the target to one step: the next less-reducing config of the proposal costs more
        assert solution.cost <= solution.target < solution.below, candidate.prune.describe()
    elif not solution.reached:  # a share below what the reducer can reach at all: its cheapest config
        option = (candidate.prune.reducer, ("mass" if candidate.prune.adaptive else "value")
                  if candidate.prune.reducer == "sait" else None)
        assert cost == proposer.cost(proposer.cheapest[option]), candidate.prune.describe()


CASES = [("quick", 0.35), ("quick", 0.55), ("quick", 0.6), ("tiny", 0.6), ("deit", 0.35), ("deit", 0.6)]


@pytest.mark.parametrize("space", ["default", "evit_tome", "sait"])
@pytest.mark.parametrize("key, fraction", CASES)
def test_random_and_tpe_proposals_land_within_budget_on_their_share(space, key, fraction):
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    proposer = proposer_for(key, fraction, space)
    samplers = [optuna.samplers.RandomSampler(seed=1),
                optuna.samplers.TPESampler(multivariate=True, group=True, seed=1, n_startup_trials=5)]
    for sampler in samplers:
        study = optuna.create_study(direction="maximize", sampler=sampler)
        for _ in range(20):
            trial = study.ask()
            candidate, solution = proposer.propose_with_solution(trial)
            check_solution(proposer, candidate, solution, trial.params.get("budget_share", 1.0))
            study.tell(trial, solution.cost)  # TPE is pushed towards the budget's edge


def test_a_solve_finds_the_least_reduction_that_fits_as_enumeration_does():
    model, _ = model_and_calibration("quick")
    cost = functools.partial(predict_flops, model)
    dense = predict_flops(model)
    for fraction in (0.4, 0.55, 0.8):
        target = fraction * dense
        tome = solve(removal_family({"reducer": "tome"}, (1.0,) * 6, 0, 32), cost, target)
        fitting = [r for r in range(33) if cost(PruneConfig(reducer="tome", r=r)) <= target]
        assert tome.config.r == min(fitting)
        evit = solve(keep_rate_family({"reducer": "evit", "layers": (1,)}, (1.0,), 0.05, 1.0), cost, target)
        kept = [k for k in range(1, 65) if cost(PruneConfig(reducer="evit", layers=(1,), keep_rate=k / 64)) <= target]
        assert math.ceil(round(evit.config.keep_rate * 64, 6)) == max(kept)
    # the shortest decimal of the step: EViT's 0.7 reads 0.7
    exact = cost(PruneConfig(reducer="evit", layers=(1, 3), keep_rate=0.7))
    assert solve(keep_rate_family({"reducer": "evit", "layers": (1, 3)}, (1.0, 1.0), 0.1, 1.0), cost,
                 exact).config.keep_rate == 0.7


@pytest.mark.parametrize("key", ["quick", "deit"])
@pytest.mark.parametrize("fraction", [0.35, 0.55, 0.6])
def test_warm_starts_exist_for_every_reducer_solved_to_the_budget(key, fraction):
    proposer = proposer_for(key, fraction)
    params = warm_start_params(proposer)
    reducers = {name.split()[0] for name in params}
    assert reducers == REDUCERS and any(" M" in name for name in params), sorted(params)
    for name, point in params.items():
        candidate, solution = proposer.propose_with_solution(Replay(point))
        assert point["budget_share"] == 1.0 and solution.cost <= proposer.limit
        assert solution.below is None or solution.below > proposer.limit, name  # the whole budget, to one step
    if key == "deit" and fraction == 0.6:  # the papers' layouts on a depth-12 model
        configs = {name.split()[0]: proposer.propose(Replay(point)).prune for name, point in params.items()}
        assert configs["evit"].layers == configs["ppt"].layers == (3, 6, 9)
        assert isinstance(configs["evit"].keep_rate, float) and isinstance(configs["tome"].r, int)
        assert configs["sait"].layers == (3,)


@pytest.mark.parametrize("key, fraction", [("deit", 0.8), ("quick", 0.6)])
def test_hand_designed_configs_round_trip_through_params(key, fraction):
    proposer = proposer_for(key, fraction)
    for name, candidate in hand_designed(proposer).items():
        if proposer.cost(candidate.prune) > proposer.limit:
            continue
        params = proposer.params_for(candidate)
        assert params is not None, name
        assert proposer.equivalent(proposer.propose(Replay(params)), candidate), name
        assert proposer.params_for(proposer.propose(Replay(params))) == params, name
    # a config the space cannot express has no params: over the budget, or a reducer it lacks
    assert proposer.params_for(Candidate(PruneConfig(reducer="evit", layers=(0, 1), keep_rate=0.99))) is None
    assert proposer_for(key, fraction, "sait").params_for(hand_designed(proposer)["evit"]) is None


def test_params_for_a_proposal_give_it_back_or_nothing():
    """Exact for evenly spaced layers with a constant or unclipped linear schedule (every hand
    config); otherwise None, never the params of another config."""
    proposer = proposer_for("quick", 0.6)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=3))
    found = 0
    for _ in range(30):
        trial = study.ask()
        candidate = proposer.propose(trial)
        params = proposer.params_for(candidate)
        if params is not None:
            assert proposer.equivalent(proposer.propose(Replay(params)), candidate), candidate.prune.describe()
            found += 1
        study.tell(trial, 0.0)
    assert found >= 10


OLD_DEFAULT = """
reducers: [evit, tome, ppt, tps, bat, sait]
layers: {count: [1, 3], first: [0.1, 0.5], spacing: [0.1, 0.35]}
keep_rate: [0.4, 0.95]
evit: {fuse: [true, false]}
tome: {r: [0.01, 0.12]}
ppt: {r: [0.05, 0.4], tau: [0.3, 30], tau_mode: cv2}
tps: {temperature: [0.2, 5]}
bat: {clusters: [1, 8], knn: [3, 10], pairs: [0, 8]}
sait: {mode: [mass, value], mass_threshold: [0.5, 0.95]}
distill: {kind: [none, logits, tis], beta: [0.1, 2.0]}
"""


def test_a_space_file_from_before_budget_exact_proposals_keeps_working(tmp_path):
    """Its ranges of keep rates and r bound the solved values; it searches constant schedules and
    budget shares of 0.6 to 1."""
    path = tmp_path / "old.yaml"
    path.write_text(OLD_DEFAULT)
    space = SearchSpace.from_file(str(path))
    assert space.specs["schedule"] == Fixed(0.0) and space.specs["budget_share"] == Range(0.6, 1.0)
    proposer = proposer_for("quick", 0.6, space)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(40):
        trial = study.ask()
        candidate, solution = proposer.propose_with_solution(trial)
        check_solution(proposer, candidate, solution, trial.params["budget_share"])
        assert "schedule" not in trial.params
        rates = candidate.prune.keep_rate
        for rate in rates if isinstance(rates, tuple) else (rates,) if rates is not None else ():
            assert 0.4 <= rate <= 0.95
        study.tell(trial, 0.0)


@pytest.mark.parametrize("text, message", [
    ("budget_share: [0, 1]", "budget_share: 0 is out of range"),
    ("schedule: [-2, 1]", "schedule: -2 is out of range"),
    ("schedule: flat", "schedule: 'flat' is not a number"),
])
def test_bad_budget_share_and_schedule_are_refused_with_the_key_named(text, message):
    with pytest.raises(SpaceError, match=message):
        SearchSpace.from_dict({"reducers": ["tome"], "tome": {"r": [0.01, 0.5]}, **_yaml(text)})


def _yaml(text: str) -> dict:
    import yaml
    return yaml.safe_load(text)


def test_options_that_cannot_reach_the_budget_are_left_out_and_none_reaching_it_is_refused():
    model, _ = model_and_calibration("quick")
    dense = predict_flops(model)
    tight = proposer_for("quick", 0.2)
    assert tight.unreachable and set(tight.reducers) < REDUCERS
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    for _ in range(20):
        trial = study.ask()
        assert tight.cost(tight.propose(trial).prune) <= tight.limit
        study.tell(trial, 0.0)
    floor = cheapest_cost(SearchSpace.from_file("default"), model)
    with pytest.raises(ProposalError, match="no reducer of the search space"):
        proposer_for("quick", 0.99 * floor / dense)


def test_calibrated_flops_of_mass_based_sait_equal_the_measured_ones():
    _, calibration = model_and_calibration("quick")
    figures = set()
    for layer, mass in ((1, 0.3), (4, 0.9)):
        cfg = PruneConfig(reducer="sait", layers=(layer,), mass_threshold=mass)
        measured = count_flops(apply(calibration.model, cfg), calibration.images)
        assert math.isclose(calibration.flops(cfg), measured, rel_tol=1e-12)
        figures.add(measured)
    assert len(figures) == 2
