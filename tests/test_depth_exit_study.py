"""benchmarks.depth_exit_study: the exit / rest split is the model, and the depth cascade decides as the plain one."""
import pytest
import torch

from mobilevit_deploy.models import create_model
from mobilevit_deploy.models.exit_head import HEADS, ExitBranch, split_model

from benchmarks.depth_exit_study import DepthCascade


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return create_model("mobilevit_xxs", num_classes=10).eval()


@pytest.mark.parametrize("k", [1, 2, 3, 4])
def test_rest_of_exit_features_is_the_model(model, k):
    exit_mod, rest_mod = split_model(model, k, "mv2s2")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits, f = exit_mod.eval()(x)
        assert logits.shape == (2, 10)
        torch.testing.assert_close(rest_mod(f), model(x), rtol=0, atol=0)


@pytest.mark.parametrize("head", sorted(HEADS))
def test_every_head_gives_class_logits(model, head):
    exit_mod = ExitBranch(model, 3, head, num_classes=7)
    with torch.no_grad():
        assert exit_mod.eval()(torch.randn(1, 3, 64, 64))[0].shape == (1, 7)


@pytest.mark.slow
def test_depth_cascade_through_one_pte(model, tmp_path):
    """One program, three methods: threshold 0 -> the exit answers every image with the `exit` method's
    logits; a threshold above 1 -> `rest` answers, equal to the whole model (`forward`)."""
    from executorch.runtime import Runtime

    from mobilevit_deploy.export.executorch import lower

    exit_mod, rest_mod = split_model(model, 3, "mv2s2")
    exit_mod.eval()
    x0 = torch.zeros(1, 3, 64, 64)
    eps = {"exit": torch.export.export(exit_mod, (x0,)), "rest": torch.export.export(rest_mod, (exit_mod(x0)[1],)),
           "forward": torch.export.export(model, (x0,))}
    manager, outside = lower(eps)
    assert outside == {"exit": {}, "rest": {}, "forward": {}}
    pte = tmp_path / "d.pte"
    pte.write_bytes(manager.buffer)
    runner = DepthCascade(Runtime.get().load_program(str(pte)), 0.0, 1)
    torch.manual_seed(1)
    xs = [torch.randn(1, 3, 64, 64) for _ in range(3)]
    for x in xs:
        a = runner.run_prepared([x, x])
        assert a.stage == 0
        torch.testing.assert_close(a.logits, exit_mod(x)[0], rtol=1e-4, atol=1e-4)
    runner.threshold = 1.01
    for x in xs:
        a = runner.run_prepared([x, x])
        assert a.stage == 1 and len(a.max_probabilities) == 2
        torch.testing.assert_close(a.logits, model(x), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(a.logits, runner.alone.run_one(x), rtol=1e-4, atol=1e-4)
