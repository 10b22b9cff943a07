"""The training loop on tiny data: what a fold leaves on disk, exact resume after a kill, reuse of finished folds."""
import logging

import numpy as np
import pandas as pd
import pytest
import torch

from utils import machine, train
from utils.config import TrainConfig


def tiny_split(n=24, size=32, seed=0):
    rng = np.random.default_rng(seed)
    percentage = rng.integers(0, 101, n).astype(float)
    # images whose brightness carries the label, so the loss can fall
    images = (rng.normal(0, 10, (n, size, size, 3)) + percentage[:, None, None, None] * 2).clip(0, 255).astype(np.uint8)
    frame = pd.DataFrame({"name": [f"Image_{i:04d}.png" for i in range(n)], "percentage": percentage,
                          "subject": np.arange(n) // 4, "fold": (np.arange(n) // 4) % 2})
    return train.SplitImages(frame, images)


def tiny_config(**overrides):
    values = dict(model_name="tiny", arch="resnet18", head="ldl", pooling="hybrid", img_size=32, epochs=3,
                  warmup_epochs=1, batch_size=4, lr=0.01, save_last_k=2, folds=[0], randaug_n=0, device="cpu",
                  num_workers=0)
    values.update(overrides)
    return TrainConfig(**values)


@pytest.fixture(autouse=True)
def few_threads():
    torch.set_num_threads(1)


def test_fold_outputs_kept_checkpoints_and_predictions(tmp_path):
    split = tiny_split()
    val = train.SplitImages(pd.DataFrame({"name": ["v1.png", "v2.png"], "percentage": [np.nan] * 2}),
                            split.images[:2].copy())
    cfg = tiny_config(randaug_n=2, max_steps_per_epoch=2)
    predictions = train.train_fold(cfg, 0, split, tmp_path / "fold0", {"Val": val}, progress=False)
    held_out = split.frame.loc[split.frame["fold"] == 0, "name"]
    assert sorted(p.name for p in (tmp_path / "fold0").glob("checkpoint_epoch*.pt")) == \
        ["checkpoint_epoch001.pt", "checkpoint_epoch002.pt"]  # the last k=2 of 3 epochs
    assert not (tmp_path / "fold0" / "state.pt").exists()
    assert set(predictions["epoch"]) == {1, 2}
    assert set(predictions.loc[predictions["split"] == "oof", "name"]) == set(held_out)
    assert (predictions.groupby(["split", "epoch"]).size().to_dict()
            == {("Val", 1): 2, ("Val", 2): 2, ("oof", 1): len(held_out), ("oof", 2): len(held_out)})
    history = pd.read_csv(tmp_path / "fold0" / "history.csv")
    assert history["epoch"].tolist() == [0, 1, 2] and history["valid_MAE"].notna().all()
    state = torch.load(tmp_path / "fold0" / "checkpoint_epoch002.pt", weights_only=True)  # plain state dict
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize("amp_dtype, ema_decay, mix", [("auto", 0.0, "none"), ("auto", 0.9, "none"),
                                                        ("auto", 0.0, "cmixup"),  # float16: SAM with a GradScaler
                                                        pytest.param("float16", 0.0, "none", marks=pytest.mark.slow)])
# that backs off here (fp16 on the CPU is slow: ~40 s); ema_decay: the average is resumed along with the weights;
# cmixup: the partners and weights drawn again as they were
def test_kill_and_rerun_resumes_to_the_same_weights(tmp_path, monkeypatch, caplog, amp_dtype, ema_decay, mix):
    split = tiny_split()
    cfg = tiny_config(sam="sam", amp_dtype=amp_dtype, ema_decay=ema_decay, mixup=mix,
                      randaug_n=0 if mix == "none" else 1)
    reference = train.train_fold(cfg, 0, split, tmp_path / "straight", progress=False)

    calls = {"n": 0}
    real_call = train.StepRunner.__call__

    def dies_in_epoch_two(self, images, targets):
        calls["n"] += 1
        if calls["n"] == 5:  # 12 training slices, batch 4: 3 steps per epoch; dies in epoch 2
            raise KeyboardInterrupt("simulated kill")
        return real_call(self, images, targets)

    monkeypatch.setattr(train.StepRunner, "__call__", dies_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train.train_fold(cfg, 0, split, tmp_path / "killed", progress=False)
    state = torch.load(tmp_path / "killed" / "state.pt", weights_only=True)
    assert state["epoch"] == 0 and ("grad_scaler" in state) == (amp_dtype == "float16")
    assert ("ema" in state) == (ema_decay > 0) and "model" in state
    monkeypatch.setattr(train.StepRunner, "__call__", real_call)
    with caplog.at_level(logging.INFO, logger="utils"):
        resumed = train.train_fold(cfg, 0, split, tmp_path / "killed", progress=False)
    assert "resuming after epoch 1" in caplog.text
    pd.testing.assert_frame_equal(resumed, reference)  # same data order + same momentum => same predictions
    for name in ("checkpoint_epoch001.pt", "checkpoint_epoch002.pt"):
        a = torch.load(tmp_path / "straight" / name, weights_only=True)
        b = torch.load(tmp_path / "killed" / name, weights_only=True)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_ema_keeps_and_predicts_with_the_moving_average_of_the_trained_weights(tmp_path, monkeypatch):
    split = tiny_split()
    decay = 0.75
    cfg = tiny_config(arch="resnet10t", epochs=1, warmup_epochs=0, save_last_k=1, max_steps_per_epoch=2,
                      ema_decay=decay)
    trained = []  # the trained weights before the first step and after each step
    real_call = train.StepRunner.__call__

    def recording(self, images, targets):
        if not trained:
            trained.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        parts = real_call(self, images, targets)
        trained.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        return parts

    monkeypatch.setattr(train.StepRunner, "__call__", recording)
    predictions = train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)
    kept = torch.load(tmp_path / "f" / "checkpoint_epoch000.pt", weights_only=True)
    w0, w1, w2 = trained
    for key, value in kept.items():
        if not value.is_floating_point():  # BatchNorm's step counter is copied, not averaged
            assert torch.equal(value, w2[key])
            continue
        by_hand = decay * (decay * w0[key] + (1 - decay) * w1[key]) + (1 - decay) * w2[key]
        torch.testing.assert_close(value, by_hand, rtol=1e-5, atol=1e-6)
    first_conv = next(k for k in kept if k.endswith("weight"))
    assert not torch.allclose(kept[first_conv], w2[first_conv])  # the average, not the last trained weights
    model = train.build_model_for(cfg, torch.device("cpu"), for_checkpoint=True)
    model.load_state_dict(kept)
    held_out = split.subset(split.frame["fold"].to_numpy() == 0)
    oof = predictions[predictions["split"] == "oof"].set_index("name").loc[held_out.frame["name"], "prediction"]
    np.testing.assert_allclose(oof.to_numpy(), train.predict(model, held_out.images, cfg, torch.device("cpu")),
                               rtol=1e-5, atol=1e-4)


def test_finished_fold_is_reused_not_retrained(tmp_path, monkeypatch):
    split = tiny_split()
    cfg = tiny_config(epochs=1, warmup_epochs=0, save_last_k=1, max_steps_per_epoch=1)
    first = train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)
    monkeypatch.setattr(train, "build_model_for", lambda *a, **k: pytest.fail("a finished fold must not train again"))
    again = train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)
    pd.testing.assert_frame_equal(first, again)


def test_sam_loss_falls_on_learnable_data(tmp_path):
    split = tiny_split(n=32)
    cfg = tiny_config(head="exp", epochs=4, save_last_k=1, lr=0.02, randaug_n=0)
    train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)
    history = pd.read_csv(tmp_path / "f" / "history.csv")
    assert history["train_loss"].iloc[-1] < history["train_loss"].iloc[0]


def test_epoch_shuffle_sampler_is_a_function_of_seed_and_epoch():
    a, b = train.EpochShuffleSampler(10, seed=3), train.EpochShuffleSampler(10, seed=3)
    a.set_epoch(2), b.set_epoch(2)
    assert list(a) == list(b) and sorted(a) == list(range(10))
    b.set_epoch(3)
    assert list(a) != list(b)


def test_missing_fold_is_an_error(tmp_path):
    with pytest.raises(ValueError, match="fold 7 has no slices"):
        train.train_fold(tiny_config(folds=[7]), 7, tiny_split(), tmp_path / "f", progress=False)


def test_a_fold_trained_with_another_recipe_is_not_reused(tmp_path):
    split = tiny_split()
    cfg = tiny_config(epochs=1, warmup_epochs=0, save_last_k=1, max_steps_per_epoch=1)
    train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)
    changed = tiny_config(epochs=1, warmup_epochs=0, save_last_k=1, max_steps_per_epoch=1, lr=0.5, num_workers=1)
    with pytest.raises(ValueError, match=r"another recipe \(lr: 0.01 -> 0.5\)"):
        train.train_fold(changed, 0, split, tmp_path / "f", progress=False)


def test_a_fold_with_other_held_out_slices_is_not_reused(tmp_path):
    split = tiny_split()
    cfg = tiny_config(epochs=1, warmup_epochs=0, save_last_k=1, max_steps_per_epoch=1)
    train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)
    split.frame["fold"] = 1 - split.frame["fold"]  # folds remade: fold 0 now holds other subjects
    with pytest.raises(ValueError, match="other held-out slices"):
        train.train_fold(cfg, 0, split, tmp_path / "f", progress=False)


def test_loader_workers_start_by_fork_even_where_the_default_is_spawn():
    """Inside a Dask worker the default start method is spawn: each evaluation loader's workers would import torch
    again every epoch (seconds each; 32 s for a 60-slice epoch on 2 cores, 0.6 s by fork)."""
    import multiprocessing

    from utils.train import make_loader

    if "fork" not in multiprocessing.get_all_start_methods():
        pytest.skip("no fork on this OS: the platform's default start method is used")
    cfg = TrainConfig(num_workers=1, device="cpu", batch_size=4)
    loader = make_loader(torch.utils.data.TensorDataset(torch.zeros(8, 1)), cfg, torch.device("cpu"), train=False)
    assert loader.multiprocessing_context.get_start_method() == "fork"
    assert [len(batch[0]) for batch in loader] == [8]


@pytest.mark.filterwarnings("ignore:torch.cuda.amp.GradScaler is enabled, but CUDA is not available")
@pytest.mark.parametrize("capability, expected", [((7, 5), torch.float16), ((8, 0), torch.bfloat16)])
def test_autocast_is_bf16_where_the_gpu_computes_it_else_fp16_with_a_scaler(monkeypatch, capability, expected):
    """T4 (7.5), V100, P100 emulate bf16 (slower than fp32): fp16 with loss scaling there; A100 (8.0) on: bf16."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    cuda = torch.device("cuda")
    assert machine.amp_dtype(tiny_config(amp_dtype="auto"), cuda) == expected
    assert (machine.grad_scaler(tiny_config(amp_dtype="auto"), cuda) is not None) == (expected == torch.float16)
    assert machine.amp_dtype(tiny_config(amp_dtype="bfloat16"), cuda) == torch.bfloat16  # asked for: as asked
    assert machine.amp_dtype(tiny_config(amp=False), cuda) is None
    assert machine.amp_dtype(tiny_config(), torch.device("cpu")) is None  # auto on the CPU: float32


@pytest.mark.parametrize("flags, expected", [("fpu avx512f avx512_bf16 sse", torch.bfloat16),
                                             ("fpu amx_tile amx_bf16", torch.bfloat16), ("fpu avx512f avx2", None)])
def test_cpu_bf16_is_bf16_only_where_the_cpu_computes_it(monkeypatch, flags, expected):
    monkeypatch.setattr(machine, "_cpuinfo", lambda: {"model name": "a CPU", "flags": flags})
    cpu = torch.device("cpu")
    assert machine.amp_dtype(tiny_config(cpu_bf16=True), cpu) == expected
    assert machine.amp_dtype(tiny_config(cpu_bf16=False), cpu) is None
    assert machine.amp_dtype(tiny_config(cpu_bf16=True, amp=False), cpu) is None
    assert machine.amp_dtype(tiny_config(cpu_bf16=True, amp_dtype="float16"), cpu) == torch.float16  # as asked


def test_a_compiled_sam_step_learns_what_the_eager_step_learns():
    """compile: reduce-overhead (CUDA graphs on a GPU; on the CPU torch compiles without them) through StepRunner:
    SAM's two passes per step give the eager step's losses and weights."""
    def two_steps(compile_mode):
        cfg = tiny_config(arch="resnet10t", in_chans=1, compile=compile_mode)
        torch.manual_seed(0)
        model = train.build_model_for(cfg, torch.device("cpu"))
        runner = train.StepRunner(model, train.build_optimizer(model, cfg), cfg, torch.device("cpu"))
        images = torch.randint(0, 256, (4, 1, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
        batch = runner.to_device(images, torch.tensor([0.0, 10.0, 50.0, 100.0]))
        losses = [float(runner(*batch)["loss"]) for _ in range(2)]
        return losses, torch.cat([p.detach().flatten() for p in model.parameters()])

    eager_losses, eager_weights = two_steps(False)
    compiled_losses, compiled_weights = two_steps("reduce-overhead")
    assert compiled_losses == pytest.approx(eager_losses, rel=1e-5)
    assert eager_losses[1] != eager_losses[0]  # the weights moved between the steps
    torch.testing.assert_close(compiled_weights, eager_weights, rtol=1e-4, atol=1e-5)
