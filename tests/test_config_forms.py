"""Every way DeepSpeed-MII passes a configuration to `mii.serve` and `mii.pipeline`, with
MII's precedence; MII's options that do nothing here warn once; a launcher's ranks."""

from __future__ import annotations

import warnings

import pytest

import mii
from mii.config import MIIConfig, ModelConfig
from mii.config_forms import mii_config_of, model_config_of
from mii.errors import UnknownArgument
from mii.ignored_options import IgnoredOptionWarning
from mii.launch import serve as launcher
from mii.launcher_env import LaunchedRank, without_launcher

pytestmark = pytest.mark.timeout(30)
M = "some/model"


@pytest.fixture
def served(monkeypatch):
    """What mii.serve hands the launcher (nothing starts)."""
    seen: list[MIIConfig] = []
    monkeypatch.setattr(launcher, "serve_deployment", lambda config: seen.append(config) or config)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)
    return seen


NESTED = {"deployment_name": "d", "model_config": {"model_name_or_path": M, "tensor_parallel": 1,
          "max_length": 256}}  # fmt: skip


@pytest.mark.parametrize(
    "call",
    [
        lambda: mii.serve(M, deployment_name="d", tensor_parallel=1, max_length=256),
        lambda: mii.serve(
            model_config={"model_name_or_path": M, "max_length": 256},
            mii_config={"deployment_name": "d"},
        ),  # fmt: skip
        lambda: mii.serve(mii_config=NESTED),  # MII's documented form (issue 19)
        lambda: mii.serve(mii_config=MIIConfig(**NESTED)),
        lambda: mii.serve(
            mii_config=MIIConfig(
                deployment_name="d", model_config=ModelConfig(model_name_or_path=M, max_length=256)
            )
        ),  # fmt: skip
        lambda: mii.serve(
            M,
            model_config=ModelConfig(model_name_or_path=M),
            max_length=256,
            mii_config={"deployment_name": "d"},
        ),  # fmt: skip
        lambda: mii.serve(
            M, mii_config={"model_config": {"max_length": 256}}, deployment_name="d"
        ),  # fmt: skip
    ],
)
def test_every_call_form_gives_the_same_deployment(served, call):
    config = call()
    assert (config.deployment_name, config.model_conf.model_name_or_path) == ("d", M)
    assert config.model_conf.max_length == 256 and config.model_conf.tensor_parallel == 1


def test_model_config_replaces_the_one_inside_mii_config():
    config = mii_config_of("", {"model_name_or_path": "a"}, NESTED, {})
    assert config.model_conf.model_name_or_path == "a" and config.model_conf.max_length is None
    assert config.deployment_name == "d"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("b", {"model_name_or_path": M}, None, {}), "model_name_or_path='b' contradicts"),
        ((M, {"max_length": 5}, None, {"max_length": 6}), "max_length=6 contradicts"),
        ((M, None, {"deployment_name": "d"}, {"deployment_name": "e"}), "deployment_name='e'"),
    ],
)
def test_contradicting_values_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        mii_config_of(*args)


def test_unknown_keywords_are_refused_by_name():
    with pytest.raises(UnknownArgument, match="no_such_option") as caught:
        mii_config_of(M, None, None, {"no_such_option": 1})
    assert isinstance(caught.value, TypeError)  # as before, and as MII's
    with pytest.raises(UnknownArgument, match="deployment_name"):
        mii.pipeline(M, deployment_name="d")  # a deployment option means nothing here
    with pytest.raises(TypeError, match="model_config must be a dict or a ModelConfig"):
        model_config_of("", ["x"], {})


def test_the_nested_model_config_may_use_the_python_name():
    config = mii_config_of("", None, {"model_conf": {"model_name_or_path": M}}, {})
    assert config.model_conf.model_name_or_path == M


def test_ignored_options_warn_once_and_defaults_do_not(served):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("default")  # Python's own: once per message and call site
        for _ in range(3):
            mii.serve(M, port_number=1234, sync_debug=True, zmq_port_number=25555)
    messages = sorted(str(w.message) for w in caught if w.category is IgnoredOptionWarning)
    assert len(messages) == 2
    assert messages[0].startswith("port_number has no effect in mii: clients reach workers")
    assert messages[1].startswith("sync_debug has no effect in mii")


def test_aml_deployments_and_quantization_are_refused_clearly(served):
    with pytest.raises(ValueError, match="deployment_type 'aml' is not supported"):
        mii.serve(M, deployment_type="aml")
    with pytest.raises(ValueError, match="quantization_mode 'wf6af16' is not supported: mii "
                       "runs FP8 weights"):  # fmt: skip
        mii.serve(M, quantization_mode="wf6af16")
    assert not served


def test_mii_options_that_mii_accepts_now(served):
    config = mii.serve(M, hostfile="/etc/hosts", version=2, instance_type="x")
    assert config.hostfile == "/etc/hosts"


# ---- a launcher's processes -----------------------------------------------------------


def test_launched_rank_from_the_environment():
    assert LaunchedRank.from_environment({}) is None
    assert LaunchedRank.from_environment({"WORLD_SIZE": "1", "RANK": "0"}) is None
    env = {"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1", "MASTER_PORT": "1", "PATH": "/"}
    assert LaunchedRank.from_environment(env) == LaunchedRank(3, 4, 1)
    assert without_launcher(env | {"TORCHELASTIC_RUN_ID": "x"}) == {"PATH": "/"}


def test_serve_under_a_launcher_starts_on_rank_0_only(served, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert mii.serve(M) is None and not served
    monkeypatch.setenv("RANK", "0")
    assert mii.serve(M).model_conf.tensor_parallel == 2  # MII's default: WORLD_SIZE


def test_pipeline_under_a_launcher_needs_a_group_of_all_or_one(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(ValueError, match="tensor_parallel=3 under a launcher of 2 processes"):
        mii.pipeline(M, tensor_parallel=3)
