"""The trainer: rectified-flow sampling, a tiny end-to-end run in the published layout, resume."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from refany3d.data import load_asset_views, make_dataset
from refany3d.errors import InputError
from refany3d.pipeline import RefAny3DPipeline
from refany3d.tiny import TinyConfig, build_base_pipeline
from refany3d.train import CaptionEncoder, RefAny3DObjective, TrainConfig, preset_config, run_stage, sample_flow, train

from conftest import REPO


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    return make_dataset(tmp_path_factory.mktemp("data"), count=4, n_views=2, resolution=32, seed=7, targets_per_asset=2)


@pytest.fixture(scope="module")
def trained(dataset: Path, tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("run")
    config = preset_config("tiny", data=[str(dataset)], output_dir=str(out), condition_size=16)
    summary = train(config, log=lambda line: None)
    return out, summary


def test_flow_sample_interpolates_between_data_and_noise() -> None:
    x0 = torch.randn(512, 4, 2, 2)
    x_t, t, target = sample_flow(x0, torch.Generator().manual_seed(0))
    assert t.shape == (512,) and (t > 0).all() and (t < 1).all()
    # t = sigmoid(randn): symmetric about 1/2, concentrated in the middle
    assert abs(t.median().item() - 0.5) < 0.05 and ((t > 0.27) & (t < 0.73)).float().mean() > 0.6
    tt = t.view(-1, 1, 1, 1)
    torch.testing.assert_close(x_t - tt * target, x0)  # x_t = (1-t) x0 + t noise, target = noise - x0
    noise = target + x0
    assert abs(noise.std().item() - 1.0) < 0.05


def test_tiny_run_writes_the_published_layout(trained: tuple[Path, dict]) -> None:
    out, summary = trained
    for name in ("model_index.json", "transformer/config.json", "vae/config.json", "text_encoder_2/config.json"):
        assert (out / "base" / name).exists(), name
    for name in ("coord.safetensors", "default.safetensors", "domain_embedder.pth"):
        assert (out / "ref" / name).exists(), name
    assert (out / "loss_curve.png").stat().st_size > 1000
    assert set(summary["stages"]) == {"vae", "base", "refany3d"}
    for stage in summary["stages"].values():
        assert stage["steps"] == 2 and all(np.isfinite(stage["losses"]))
    assert not (out / "checkpoints" / "refany3d.pt").exists()  # removed once the result is saved
    # LoRA B starts at zero: after training it is not, so the adapters were optimised
    for name in ("coord", "default"):
        weights = load_file(out / "ref" / f"{name}.safetensors")
        b = [v for k, v in weights.items() if "lora_B" in k]
        assert b and any(v.abs().sum() > 0 for v in b), name
    # the VAE's latent statistics were measured (not the builder's constants)
    from refany3d.tiny import TinyConfig, build_base_pipeline

    built = build_base_pipeline(TinyConfig()).vae.config
    vae = json.loads((out / "base" / "vae" / "config.json").read_text())
    assert (vae["shift_factor"], vae["scaling_factor"]) != (built.shift_factor, built.scaling_factor)
    # the model's sampling settings are its training sizes (tiny preset: 32 px, 2 views at 16 px)
    from refany3d.pipeline import recommended_settings

    settings = recommended_settings(out / "ref")
    assert (settings["height"], settings["width"], settings["condition_size"], settings["n_views"]) == (32, 32, 16, 2)
    assert settings["max_sequence_length"] == build_base_pipeline(TinyConfig()).tokenizer_2.model_max_length


def test_vae_posterior_is_nearly_deterministic(trained: tuple[Path, dict]) -> None:
    from diffusers import AutoencoderKL

    out, _ = trained
    vae = AutoencoderKL.from_pretrained(out / "base" / "vae")
    with torch.no_grad():
        posterior = vae.encode(torch.rand(2, 3, 32, 32) * 2 - 1).latent_dist
    # sampled latents of the reference views must not be drowned in noise
    assert posterior.std.max() < 0.1 < posterior.mean.std()


def test_trained_model_loads_and_samples(trained: tuple[Path, dict], dataset: Path) -> None:
    from refany3d.pipeline import RefAny3DPipeline

    out, _ = trained
    pipe = RefAny3DPipeline.from_pretrained(out / "base", out / "ref", device="cpu")
    asset = sorted((dataset / "assets").iterdir())[0]
    rgb, pm, _ = load_asset_views(asset, 32, 2)
    result = pipe("a red box on a blue floor", list(rgb), list(pm), height=32, width=32, condition_size=16,
                  num_inference_steps=2, output_type="np")
    assert result.image.shape == (32, 32, 3) and result.pointmap.shape == (32, 32, 3)
    assert np.isfinite(result.image).all()


def test_rerun_skips_finished_stages(trained: tuple[Path, dict], dataset: Path) -> None:
    out, _ = trained
    before = (out / "ref" / "coord.safetensors").read_bytes()
    lines: list[str] = []
    summary = train(preset_config("tiny", data=[str(dataset)], output_dir=str(out), condition_size=16), log=lines.append)
    assert (out / "ref" / "coord.safetensors").read_bytes() == before
    assert summary["stages"]["refany3d"]["steps"] == 2 and not lines  # nothing ran, nothing to say
    # changed settings cannot reach finished stages: the rerun says so instead of seeming to apply them
    train(preset_config("tiny", data=[str(dataset)], output_dir=str(out), condition_size=16, ref_steps=4),
          log=lines.append)
    assert lines == [f"note: {out} holds an earlier run; its finished stages (vae, base, refany3d) stay as trained, "
                     "so changed settings (ref_steps) apply only to stages not finished yet"]
    assert (out / "ref" / "coord.safetensors").read_bytes() == before


class _Regression(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(3, 1)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.mse_loss(self.linear(x), y)


def _batches(stop_after: int | None = None):
    gen = torch.Generator().manual_seed(0)
    for i in range(10_000):
        if stop_after is not None and i == stop_after:
            raise KeyboardInterrupt
        x = torch.randn(16, 3, generator=gen)
        yield {"x": x, "y": x @ torch.tensor([[1.0], [-2.0], [0.5]])}


def test_stage_zero_stages_run_apart_and_a_finished_one_is_kept(dataset: Path, tmp_path: Path) -> None:
    """`--stages vae` then `--stages base`: the base trains on the finished VAE, which stays as it was."""
    from safetensors.torch import load_file as load

    out = tmp_path / "split"
    settings = dict(data=[str(dataset)], output_dir=str(out), condition_size=16)
    train(preset_config("tiny", stages=("vae",), **settings), log=lambda line: None)
    vae = load(out / "base" / "vae" / "diffusion_pytorch_model.safetensors")
    transformer = load(out / "base" / "transformer" / "diffusion_pytorch_model.safetensors")
    summary = train(preset_config("tiny", stages=("base",), **settings), log=lambda line: None)
    assert set(summary["stages"]) == {"vae", "base"}
    for name, weight in load(out / "base" / "vae" / "diffusion_pytorch_model.safetensors").items():
        torch.testing.assert_close(weight, vae[name], rtol=0, atol=0)
    trained = load(out / "base" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(trained[name], weight) for name, weight in transformer.items())


def test_unreadable_checkpoints_and_a_missing_base_are_named(tmp_path: Path) -> None:
    from accelerate import Accelerator

    config = TrainConfig(data=["unused"], output_dir=str(tmp_path), checkpoint_every=3, warmup_steps=1)
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "toy.pt").write_bytes(b"cut short")
    with pytest.raises(InputError, match="checkpoint .*toy.pt cannot be read .*; delete it to restart the toy stage"):
        run_stage("toy", Accelerator(cpu=True), _Regression(), _batches(), lambda b: b, 5, 0.05, config)
    with pytest.raises(InputError, match="stage refany3d needs a base: .* Train stage 0 first"):
        train(preset_config("tiny", data=["unused"], output_dir=str(tmp_path / "none"), stages=("refany3d",)))


def test_interrupted_stage_resumes_from_its_checkpoint(tmp_path: Path) -> None:
    from accelerate import Accelerator

    config = TrainConfig(data=["unused"], output_dir=str(tmp_path), checkpoint_every=3, warmup_steps=1)
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    first = _Regression()
    with pytest.raises(KeyboardInterrupt):
        run_stage("toy", accelerator, first, _batches(stop_after=7), lambda b: b, 20, 0.05, config)
    checkpoint = torch.load(tmp_path / "checkpoints" / "toy.pt", weights_only=False)
    assert checkpoint["step"] == 6 and len(checkpoint["losses"]) == 6
    assert not (tmp_path / "checkpoints" / "toy.pt.partial").exists()  # written aside, then renamed

    second = _Regression()  # fresh weights: resuming must restore the checkpoint's
    seen = {}

    def to_inputs(batch):
        seen.setdefault("weight", second.linear.weight.detach().clone())
        return batch

    result = run_stage("toy", accelerator, second, _batches(), to_inputs, 20, 0.05, config)
    torch.testing.assert_close(seen["weight"], checkpoint["trainable"]["linear.weight"])
    assert result.resumed_from == 6 and len(result.losses) == 20
    assert result.losses[:6] == checkpoint["losses"]
    assert np.mean(result.losses[-3:]) < np.mean(result.losses[:3])


class _FakeClock:
    """Seconds that pass only when a step asks: `seconds_per_step(step)` per batch prepared."""

    def __init__(self, seconds_per_step):
        self.now, self.steps, self.seconds_per_step = 0.0, 0, seconds_per_step

    def __call__(self) -> float:
        return self.now

    def step(self, batch):
        self.steps += 1
        self.now += self.seconds_per_step(self.steps)
        return batch


def test_time_budget_sets_the_step_count_to_what_fits_and_the_schedule_decays_over_it(tmp_path: Path) -> None:
    from accelerate import Accelerator

    from refany3d.train import PROBE_STEPS

    config = TrainConfig(data=["unused"], output_dir=str(tmp_path), checkpoint_every=5, warmup_steps=1)
    clock = _FakeClock(lambda step: 1.0)  # 1 s per step, 30 s of budget: 30 steps fit
    torch.manual_seed(0)
    with pytest.raises(KeyboardInterrupt):
        run_stage("toy", Accelerator(cpu=True), _Regression(), _batches(stop_after=20), clock.step, 1000, 0.05, config,
                  minutes=0.5, clock=clock)
    checkpoint = torch.load(tmp_path / "checkpoints" / "toy.pt", weights_only=False)
    assert checkpoint["step"] == 20 and checkpoint["planned_steps"] == 30 and 20 > 1 + PROBE_STEPS
    # cosine over the 30 planned steps, not the 1000 configured: at step 20, 0.5 + 0.5 cos(pi 20/30) = 0.25
    assert checkpoint["scheduler"]["_last_lr"][0] == pytest.approx(0.05 * 0.25)

    clock = _FakeClock(lambda step: 1.0)  # resumed: the 20 s already spent count, so 10 steps are left
    result = run_stage("toy", Accelerator(cpu=True), _Regression(), _batches(), clock.step, 1000, 0.05, config,
                       minutes=0.5, clock=clock)
    assert (result.resumed_from, len(result.losses), result.planned_steps, clock.steps, result.seconds) == (20, 30, 30, 10, 30)


def test_time_budget_follows_steps_that_slow_down_and_stops_a_stage_still_being_timed(tmp_path: Path, capsys) -> None:
    from accelerate import Accelerator

    config = TrainConfig(data=["unused"], output_dir=str(tmp_path), checkpoint_every=100, warmup_steps=1)
    clock = _FakeClock(lambda step: 1.0 if step <= 11 else 3.0)  # 1 s per step, then 3 s: 30 planned at step 11
    result = run_stage("toy", Accelerator(cpu=True), _Regression(), _batches(), clock.step, 1000, 0.05, config,
                       minutes=0.5, clock=clock)
    # Re-estimated at the mean step time since step 1: at step 17 (29 s) the mean is 28/16 s, the 1 s left fits no more
    assert (len(result.losses), result.planned_steps, result.seconds) == (17, 17, 29.0)
    assert "budget ran out" not in capsys.readouterr().out

    clock = _FakeClock(lambda step: 1.0)  # a 6 s budget is spent before the step count is first estimated
    result = run_stage("toy", Accelerator(cpu=True), _Regression(), _batches(), clock.step, 1000, 0.05, config,
                       minutes=0.1, clock=clock)
    assert (len(result.losses), result.planned_steps) == (6, 1000)
    assert "toy: the 0.1-minute budget ran out after step 6 of 1000" in capsys.readouterr().out

    untimed = run_stage("toy2", Accelerator(cpu=True), _Regression(), _batches(), lambda b: b, 12, 0.05, config)
    assert (len(untimed.losses), untimed.planned_steps) == (12, 12)


def test_train_cli_passes_the_time_budget_and_refuses_a_bad_one(trained: tuple[Path, dict], dataset: Path,
                                                                 tmp_path: Path, capsys) -> None:
    from refany3d.cli import main

    common = ["train", str(dataset), "--preset", "tiny", "--condition-size", "16", "--stages", "refany3d",
              "--base-model", str(trained[0] / "base")]
    assert main([*common, "--out", str(tmp_path / "bad"), "--ref-minutes", "0"]) == 2
    assert "ref_minutes must be a positive number of minutes, got 0.0" in capsys.readouterr().err

    assert main([*common, "--out", str(tmp_path / "run"), "--ref-minutes", "5", "--ref-steps", "3", "--lr", "0.002",
                 "--base-lr", "0.003", "--vae-lr", "0.004"]) == 0
    run = tmp_path / "run"
    recorded = json.loads((run / "train_config.json").read_text())
    assert (recorded["ref_lr"], recorded["base_lr"], recorded["vae_lr"]) == (0.002, 0.003, 0.004)
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"{run} holds {run / 'ref'}, {run / 'settings.json'}, {run / 'loss_curve.png'} (refany3d: 3 steps)")  # no base/
    assert json.loads((tmp_path / "run" / "train_config.json").read_text())["ref_minutes"] == 5.0
    stage = json.loads((tmp_path / "run" / "training_summary.json").read_text())["stages"]["refany3d"]
    assert (stage["steps"], stage["planned_steps"]) == (3, 3)  # too few steps to probe: the count stands


def test_caption_encoder_encodes_each_caption_once_and_gives_the_pipelines_encodings() -> None:
    flux = build_base_pipeline(TinyConfig(vocabulary=["red", "blue", "box", "ball"]), seed=0)
    asked: list[list[str]] = []
    encode_prompt = flux.encode_prompt
    flux.encode_prompt = lambda prompt, **kw: (asked.append(list(prompt)), encode_prompt(prompt=prompt, **kw))[1]
    encoder = CaptionEncoder(flux, max_length=16)
    captions = ["red box", "", "blue ball", "red box"]
    text, pooled, ids = encoder(captions)
    with torch.no_grad():
        reference_text, reference_pooled, reference_ids = encode_prompt(prompt=captions, prompt_2=None, max_sequence_length=16)
    np.testing.assert_allclose(text.numpy(), reference_text.numpy(), atol=1e-6)
    np.testing.assert_allclose(pooled.numpy(), reference_pooled.numpy(), atol=1e-6)
    assert ids.shape == reference_ids.shape and not ids.any()
    encoder(["blue ball", "red ball", ""])
    assert asked == [["red box", "", "blue ball"], ["red ball"]]  # each caption encoded once, batched

    full = CaptionEncoder(flux, max_length=16, max_bytes=0)  # nothing kept, same answers
    np.testing.assert_allclose(full(captions)[0].numpy(), text.numpy(), atol=1e-6)
    full(captions)
    assert full.cache == {} and full.cache.bytes == 0


def test_bad_configs_raise_input_errors() -> None:
    with pytest.raises(InputError, match="stage"):
        TrainConfig(data=["d"], output_dir="o", stages=("vae", "distill"))
    with pytest.raises(InputError, match="optimizer"):
        TrainConfig(data=["d"], output_dir="o", optimizer="sgd")
    with pytest.raises(InputError, match="preset"):
        preset_config("huge", data=["d"], output_dir="o")
    with pytest.raises(InputError, match="dropout"):
        TrainConfig(data=["d"], output_dir="o", text_dropout=1.5)
    with pytest.raises(InputError, match="asset_loss_weight must be positive, got 0"):
        TrainConfig(data=["d"], output_dir="o", asset_loss_weight=0)
    with pytest.raises(InputError, match="ref_minutes must be a positive number of minutes, got -1"):
        TrainConfig(data=["d"], output_dir="o", ref_minutes=-1)
    with pytest.raises(InputError, match="quantize must be one of int8 .*got 'nf4'"):
        TrainConfig(data=["d"], output_dir="o", quantize="nf4")
    with pytest.raises(InputError, match="no training stage given"):
        TrainConfig(data=["d"], output_dir="o", stages=())
    with pytest.raises(InputError, match="mixed_precision must be 'no', 'bf16' or 'fp16', got 'fp64'"):
        TrainConfig(data=["d"], output_dir="o", mixed_precision="fp64")
    with pytest.raises(InputError, match="ref_steps must be a positive whole number, got 0"):
        TrainConfig(data=["d"], output_dir="o", ref_steps=0)
    with pytest.raises(InputError, match="base_lr must be a finite number, got nan"):
        TrainConfig(data=["d"], output_dir="o", base_lr=float("nan"))
    with pytest.raises(InputError, match="base_lr must be a finite number >= 0, got -0.1"):
        TrainConfig(data=["d"], output_dir="o", base_lr=-0.1)
    # sizes are whole numbers, and a value of the wrong type is named, not a bare ValueError
    with pytest.raises(InputError, match="batch_size must be a positive whole number, got 1.5"):
        TrainConfig(data=["d"], output_dir="o", batch_size=1.5)
    with pytest.raises(InputError, match="n_views must be a positive whole number, got 'x'"):
        TrainConfig(data=["d"], output_dir="o", n_views="x")
    with pytest.raises(InputError, match="vae_minutes must be a finite number, got 'x'"):
        TrainConfig(data=["d"], output_dir="o", vae_minutes="x")
    with pytest.raises(InputError, match="lora_rank must be a positive whole number, got 0"):
        TrainConfig(data=["d"], output_dir="o", lora_rank=0)
    with pytest.raises(InputError, match="num_workers must be a whole number >= 0, got -1"):
        TrainConfig(data=["d"], output_dir="o", num_workers=-1)


def test_compiled_training_step_matches_eager_in_one_graph(tmp_path: Path) -> None:
    """`compile=True` trains the same function: equal losses and LoRA weights after two steps
    (Inductor told to draw random numbers like eager), and the step traces without graph breaks."""
    import copy

    import torch._dynamo
    import torch._inductor.config
    from accelerate import Accelerator

    from refany3d.train import train_only_lora

    objective = _tiny_objective(2, embedder_seed=0)
    train_only_lora(objective.transformer)
    batch = _random_stage_one_batch(objective.transformer.config, 2, torch.Generator().manual_seed(1), text_tokens=8)

    results = {}
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    with torch._inductor.config.patch(fallback_random=True):
        for compiled in (False, True):
            model = copy.deepcopy(objective)
            config = TrainConfig(data=["unused"], output_dir=str(tmp_path / str(compiled)), warmup_steps=1, compile=compiled)
            torch.manual_seed(5)
            result = run_stage("refany3d", Accelerator(cpu=True), model, iter([batch] * 2), lambda x: x, 2, 1e-2, config)
            lora = {k: v.detach().clone() for k, v in model.named_parameters() if "lora_" in k}
            results[compiled] = (result.losses, lora)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1  # it really compiled
    np.testing.assert_allclose(results[True][0], results[False][0], rtol=1e-4)
    assert results[True][0][1] != results[True][0][0]  # the first step changed the weights
    for name, weight in results[False][1].items():
        torch.testing.assert_close(results[True][1][name], weight, rtol=1e-4, atol=1e-5)


def test_no_pointmap_branch_stage_trains_the_rgb_branches_only(trained: tuple[Path, dict], dataset: Path, tmp_path: Path) -> None:
    """Without the point-map branch no branch uses `coord`, so its LoRA stays at its zero start,
    while `default` (the RGB views') learns."""
    from refany3d.pipeline import RefAny3DPipeline, default_model

    base = trained[0] / "base"
    config = preset_config("tiny", data=[str(dataset)], output_dir=str(tmp_path), condition_size=16,
                           stages=("refany3d",), base_model=str(base), pointmap_branch=False)
    train(config, log=lambda line: None)
    weights = {name: load_file(tmp_path / "ref" / f"{name}.safetensors") for name in ("coord", "default")}
    lora_b = {name: [w for key, w in ws.items() if "lora_B" in key or "lora_up" in key] for name, ws in weights.items()}
    assert lora_b["coord"] and all(w.abs().max() == 0 for w in lora_b["coord"])
    assert max(w.abs().max().item() for w in lora_b["default"]) > 0
    pipe = RefAny3DPipeline.from_pretrained(base, tmp_path / "ref", device="cpu")
    rgb, pm, _ = load_asset_views(sorted((dataset / "assets").iterdir())[0], 32, 2)
    result = pipe("a red box on a blue floor", list(rgb), list(pm), height=32, width=32, condition_size=16,
                  num_inference_steps=2, output_type="np", pointmap_branch=False)
    assert result.pointmap is None and np.isfinite(result.image).all()
    # its settings.json says how it was trained, so a call that does not say samples it that way
    assert json.loads((tmp_path / "settings.json").read_text())["pointmap_branch"] is False
    # and which base it was trained on, so its weights given alone come with that base
    assert json.loads((tmp_path / "settings.json").read_text())["base_model"] == str(base.resolve())
    assert default_model({}, ref=str(tmp_path / "ref")) == (str(base.resolve()), str(tmp_path / "ref"))
    assert pipe.default_settings["pointmap_branch"] is False and pipe.default_settings["group_mask"] is True
    again = pipe("a red box on a blue floor", list(rgb), list(pm), num_inference_steps=2, output_type="np")
    assert again.pointmap is None and again.settings["mode"] == "faithful" and again.image.shape == (32, 32, 3)


def test_stage_one_can_start_from_saved_weights(trained: tuple[Path, dict], dataset: Path, tmp_path: Path) -> None:
    """init_ref loads a finished stage 1 (LoRAs and domain embedder) to continue from: with a zero
    learning rate the run writes back exactly the weights it started from; with the usual one they move."""
    out, _ = trained
    before = {name: load_file(out / "ref" / f"{name}.safetensors") for name in ("coord", "default")}
    assert any(w.abs().max() > 0 for key, w in before["default"].items() if "lora_B" in key)  # not a fresh start
    for lr, folder in ((0.0, tmp_path / "frozen"), (1e-2, tmp_path / "moved")):
        train(preset_config("tiny", data=[str(dataset)], output_dir=str(folder), condition_size=16, stages=("refany3d",),
                            base_model=str(out / "base"), init_ref=str(out / "ref"), ref_lr=lr), log=lambda line: None)
        after = {name: load_file(folder / "ref" / f"{name}.safetensors") for name in ("coord", "default")}
        assert all(set(after[name]) == set(before[name]) for name in before)
        same = all(torch.equal(after[n][k], before[n][k]) for n in before for k in before[n])
        assert same == (lr == 0.0)
        embedder = torch.load(folder / "ref" / "domain_embedder.pth")
        start = torch.load(out / "ref" / "domain_embedder.pth")
        assert all(torch.equal(embedder[k], start[k]) for k in start) == (lr == 0.0)


def test_stage_one_on_an_int8_base_with_checkpointing_trains_the_same_weights(trained: tuple[Path, dict], dataset: Path,
                                                                               tmp_path: Path) -> None:
    """The large-base route (`--gradient-checkpointing --quantize int8`): checkpointing alone
    reproduces a plain run's losses; on an int8 base the losses differ only by the weights'
    rounding, and the LoRAs it writes are full-precision files the plain pipeline loads."""
    out, _ = trained
    runs = {}
    for name, options in (("plain", {}), ("checkpointed", {"gradient_checkpointing": True}),
                          ("int8", {"gradient_checkpointing": True, "quantize": "int8"})):
        summary = train(preset_config("tiny", data=[str(dataset)], output_dir=str(tmp_path / name), condition_size=16,
                                      stages=("refany3d",), base_model=str(out / "base"), **options), log=lambda line: None)
        runs[name] = summary["stages"]["refany3d"]["losses"]
    np.testing.assert_allclose(runs["checkpointed"], runs["plain"], rtol=1e-5)
    np.testing.assert_allclose(runs["int8"], runs["plain"], rtol=0.05)
    assert runs["int8"] != runs["plain"]  # it did run on int8 weights
    saved = load_file(tmp_path / "int8" / "ref" / "coord.safetensors")
    assert all(w.dtype == torch.float32 for w in saved.values())
    pipe = RefAny3DPipeline.from_pretrained(out / "base", tmp_path / "int8" / "ref", device="cpu")
    views = [np.full((16, 16, 3), 128, np.uint8)] * 2
    image = pipe("a box", views, views, num_inference_steps=2, generator=torch.Generator().manual_seed(0),
                 output_type="np").image
    assert image.shape == (32, 32, 3) and np.isfinite(image).all()


def _tiny_objective(n_views: int, pointmap_branch: bool = True, *, embedder_seed: int | None = None):
    """Stage 1's objective on the tiny base (seed 0) with LoRA adapters; the domain embedder is drawn
    after torch.manual_seed(embedder_seed) when that is given, else from the RNG as the base left it."""
    from refany3d.weights import add_refany3d_adapters, new_domain_embedder
    from refany3d.train import RefAny3DObjective

    transformer = build_base_pipeline(TinyConfig(), seed=0).transformer
    add_refany3d_adapters(transformer, 4, 4, init_scale=0.1)
    inner = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    if embedder_seed is not None:
        torch.manual_seed(embedder_seed)
    return RefAny3DObjective(transformer, new_domain_embedder(inner), n_views, pointmap_branch=pointmap_branch)


def _random_stage_one_batch(cfg, b: int, gen: torch.Generator, *, text_tokens: int = 6) -> dict[str, torch.Tensor]:
    """Random inputs of the stage-1 objective: 8x8 latents, 2 views of 4x4, `text_tokens` text tokens."""
    c = cfg.in_channels // 4
    return {
        "rgb_latents": torch.randn(b, c, 8, 8, generator=gen), "pm_latents": torch.randn(b, c, 8, 8, generator=gen),
        "rgb_views": torch.randn(b, 2, c, 4, 4, generator=gen), "pm_views": torch.randn(b, 2, c, 4, 4, generator=gen),
        "text": torch.randn(b, text_tokens, cfg.joint_attention_dim, generator=gen),
        "pooled": torch.randn(b, cfg.pooled_projection_dim, generator=gen), "guidance": torch.ones(b),
    }


def test_objective_is_the_mean_of_its_branch_losses_and_they_follow_t_and_noise() -> None:
    objective = _tiny_objective(2)
    cfg, gen = objective.transformer.config, torch.Generator().manual_seed(2)
    b = 3
    batch = _random_stage_one_batch(cfg, b, gen)
    with torch.no_grad():
        torch.manual_seed(9)
        loss = objective(**batch)
        torch.manual_seed(9)
        rgb, pm = objective.branch_losses(**batch)
        torch.testing.assert_close(loss, (rgb + pm) / 2)
        assert abs(rgb.item() - pm.item()) > 1e-4  # two different terms
        noise = torch.randn(b, 2, 16, cfg.in_channels, generator=gen)
        fixed = [objective.branch_losses(**batch, t=torch.full((b,), 0.8), noise=noise) for _ in range(2)]
        assert fixed[0] == fixed[1]  # nothing drawn: only the condition can change it
        later = objective.branch_losses(**batch, t=torch.full((b,), 0.3), noise=noise)
        other_noise = objective.branch_losses(**batch, t=torch.full((b,), 0.8), noise=noise.flip(0))
    assert all(abs(x.item() - y.item()) > 1e-4 for pair in (zip(fixed[0], later), zip(fixed[0], other_noise)) for x, y in pair)


def _saved_bytes_and_gradients(objective, batch) -> tuple[int, torch.Tensor, dict[str, torch.Tensor]]:
    """(bytes autograd keeps for the backward pass, the loss, the trainable parameters' gradients)."""
    saved = []

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        saved.append(tensor.untyped_storage().nbytes() if tensor.layout == torch.strided else 0)
        return tensor

    objective.zero_grad(set_to_none=True)
    torch.manual_seed(5)  # the same t, noise and dropout draws in every call
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss = objective(**batch)
    loss.backward()
    grads = {name: p.grad.clone() for name, p in objective.named_parameters() if p.requires_grad}
    return sum(saved), loss.detach(), grads


def test_gradient_checkpointing_gives_the_same_gradients_and_keeps_far_less() -> None:
    """Stage 1 with each block recomputed in the backward pass: the same loss and gradients, while
    autograd keeps a fraction of the bytes (only each block's inputs)."""
    from refany3d.train import train_only_lora

    objective = _tiny_objective(2)
    train_only_lora(objective.transformer)
    batch = _random_stage_one_batch(objective.transformer.config, 2, torch.Generator().manual_seed(3))
    kept, loss, grads = _saved_bytes_and_gradients(objective, batch)
    objective.gradient_checkpointing = True
    kept_checkpointed, loss_checkpointed, grads_checkpointed = _saved_bytes_and_gradients(objective, batch)
    assert torch.equal(loss, loss_checkpointed)
    assert grads.keys() == grads_checkpointed.keys() and len(grads) > 10
    for name, grad in grads.items():
        torch.testing.assert_close(grads_checkpointed[name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert any(grad.abs().max() > 0 for name, grad in grads.items() if "lora_A" in name)
    assert kept_checkpointed < kept / 3, (kept_checkpointed, kept)


def test_objective_without_the_pointmap_branch_ignores_point_maps() -> None:
    objective = _tiny_objective(2, pointmap_branch=False)
    cfg, gen = objective.transformer.config, torch.Generator().manual_seed(3)
    b = 2
    batch = _random_stage_one_batch(cfg, b, gen)
    fixed = dict(t=torch.full((b,), 0.7), noise=torch.randn(b, 2, 16, cfg.in_channels, generator=gen))
    with torch.no_grad():
        (rgb,) = objective.branch_losses(**batch, **fixed)
        (same,) = objective.branch_losses(**{**batch, "pm_latents": -batch["pm_latents"], "pm_views": -batch["pm_views"]}, **fixed)
        torch.manual_seed(1)
        loss = objective(**batch)
        torch.manual_seed(1)
        (drawn,) = objective.branch_losses(**batch)
        full = RefAny3DObjective(objective.transformer, objective.domain_embedder, 2)  # same weights, both branches
        full_rgb, _ = full.branch_losses(**batch, **fixed)
    assert rgb == same and loss == drawn
    assert abs(full_rgb.item() - rgb.item()) > 1e-5  # the full pass's point-map branches reach the RGB target


def test_posterior_cache_encodes_each_key_once_and_samples_like_the_vae() -> None:
    """Cached latents are draws from the same posterior with the same random numbers as encoding
    afresh (`vae.encode(...).latent_dist.sample()`), the encoder runs once per new key (repeats in
    a batch included), and `max_bytes=0` keeps nothing."""
    from refany3d.train import PosteriorCache, _encode_pixels

    vae = build_base_pipeline(TinyConfig(vae_channels=(8, 16), latent_channels=4), seed=0).vae
    vae.register_to_config(shift_factor=0.1, scaling_factor=2.0)
    pixels = torch.rand(3, 2, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    keys = ["a", "b", "a"]
    pixels[2] = pixels[0]  # a repeated key names the same pictures
    calls = []
    encode = vae.encode
    vae.encode = lambda x: calls.append(x.shape[0]) or encode(x)
    cache, nothing_kept = PosteriorCache(vae), PosteriorCache(vae, max_bytes=0)
    for round_ in range(2):
        for c in (cache, nothing_kept):
            torch.manual_seed(round_)
            cached = c(keys, pixels)
            torch.manual_seed(round_)
            afresh = _encode_pixels(vae, pixels)
            torch.testing.assert_close(cached, afresh, rtol=1e-5, atol=1e-5)
    # 2 keys x 2 views per cached encode (6 afresh); in round 2 the cache encodes nothing, the other all again
    assert calls == [4, 6, 4, 6, 6, 4, 6]
    assert cache.store.bytes > 0 and nothing_kept.store.bytes == 0 and not nothing_kept.store
    torch.manual_seed(5)
    again = cache(keys, pixels)
    assert (again - cached).abs().max() > 1e-3  # a new draw from the posterior, not a stored latent


def test_refany3d_inputs_apply_the_release_dropouts(dataset: Path) -> None:
    """Stage 1's inputs: latents at the condition size, and with dropout 1 every caption empty and
    every view the black view's latents; with dropout 0 neither."""
    from refany3d.data import SampleDataset, collate
    from refany3d.train import RefAny3DInputs

    flux = build_base_pipeline(TinyConfig(vae_channels=(8, 16), latent_channels=4), seed=0)
    items = SampleDataset([dataset], 32, 2, shuffle=False, repeat=False)
    batch = collate([items.item(i) for i in range(3)])
    keep = RefAny3DInputs(flux, 16, torch.Generator().manual_seed(0), text_dropout=0.0, reference_dropout=0.0)(batch)
    drop_all = RefAny3DInputs(flux, 16, torch.Generator().manual_seed(0), text_dropout=1.0, reference_dropout=1.0)
    dropped = drop_all(batch)
    assert keep["rgb_latents"].shape == (3, 4, 16, 16) and keep["rgb_views"].shape == (3, 2, 4, 8, 8)
    black = drop_all.black_view()
    assert black.shape == (4, 8, 8)
    for key in ("rgb_views", "pm_views"):
        assert (dropped[key] == black.expand_as(dropped[key])).all()
        assert (keep[key] - black.expand_as(keep[key])).abs().amax(dim=(1, 2, 3, 4)).min() > 1e-3
    empty, _, _ = drop_all.encode_text([""] * 3)
    captions, _, _ = drop_all.encode_text(batch["caption"])
    torch.testing.assert_close(dropped["text"], empty)
    torch.testing.assert_close(keep["text"], captions)
    assert (keep["text"] - empty).abs().max() > 1e-3


def test_asset_token_weights_follow_the_mask_in_packed_token_order() -> None:
    """A token covered by the asset weighs `asset_weight`, a half-covered one the mean, scene tokens 1;
    the order is pack_latents' order of the same latent pixels."""
    from refany3d.conditions import pack_latents
    from refany3d.train import asset_token_weights

    mask = torch.zeros(2, 1, 32, 32)
    mask[0, :, 0:8, 24:32] = 1  # token (row 0, col 3) of a 4x4 grid of 8x8-pixel tokens
    mask[0, :, 16:24, 8:12] = 1  # half of token (2, 1)
    weights = asset_token_weights(mask, 8, 5.0)
    assert weights.shape == (2, 16)
    expected = torch.ones(2, 16)
    expected[0, 3], expected[0, 9] = 5.0, 3.0
    torch.testing.assert_close(weights, expected)
    latents = torch.nn.functional.avg_pool2d(mask, 4).expand(2, 4, 8, 8)  # 4x downsampled: 2x2 latent pixels a token
    packed_share = pack_latents(latents).mean(-1)  # (B, L): the share of each packed token that is asset
    torch.testing.assert_close(weights, 1 + 4 * packed_share)


def test_weighted_flow_loss_is_the_mse_when_weights_are_equal_and_follows_them_otherwise() -> None:
    from refany3d.train import weighted_mse

    gen = torch.Generator().manual_seed(0)
    pred, target = torch.randn(2, 6, 5, generator=gen), torch.randn(2, 6, 5, generator=gen)
    plain = torch.nn.functional.mse_loss(pred, target)
    torch.testing.assert_close(weighted_mse(pred, target), plain)
    torch.testing.assert_close(weighted_mse(pred, target, torch.full((2, 6), 3.0)), plain)
    only_one = torch.zeros(2, 6)
    only_one[1, 4] = 2.0
    torch.testing.assert_close(weighted_mse(pred, target, only_one), (pred[1, 4] - target[1, 4]).pow(2).mean())


def test_refany3d_inputs_weigh_the_asset_tokens_only_when_asked(dataset: Path) -> None:
    from refany3d.data import SampleDataset, collate
    from refany3d.train import RefAny3DInputs

    flux = build_base_pipeline(TinyConfig(vae_channels=(8, 16), latent_channels=4), seed=0)
    batch = collate([SampleDataset([dataset], 32, 2, shuffle=False, repeat=False).item(i) for i in range(3)])
    plain = RefAny3DInputs(flux, 16, torch.Generator(), text_dropout=0.0, reference_dropout=0.0)(batch)
    assert "token_weights" not in plain
    weighted = RefAny3DInputs(flux, 16, torch.Generator(), text_dropout=0.0, reference_dropout=0.0, asset_weight=6.0)(batch)
    weights = weighted["token_weights"]
    assert weights.shape == (3, 64)  # 32 px, 2x VAE, 2x2 patches: 8x8 tokens of 4x4 pixels
    assert weights.min() == 1.0 and weights.max() <= 6.0
    covered = torch.nn.functional.max_pool2d(batch["mask"], 4).flatten(1) > 0
    assert covered.any(dim=1).all() and ((weights > 1) == covered).all()
    objective = _tiny_objective(2)
    small = _random_stage_one_batch(objective.transformer.config, 3, torch.Generator().manual_seed(1))
    fixed = dict(t=torch.full((3,), 0.6), noise=torch.randn(3, 2, 16, objective.transformer.config.in_channels))
    with torch.no_grad():
        equal = objective.branch_losses(**small, **fixed, token_weights=torch.ones(3, 16))
        unweighted = objective.branch_losses(**small, **fixed)
        skewed = objective.branch_losses(**small, **fixed, token_weights=torch.linspace(1, 9, 16).expand(3, 16))
    for a, b in zip(equal, unweighted):
        torch.testing.assert_close(a, b)
    assert abs(skewed[0].item() - unweighted[0].item()) > 1e-4  # the RGB target's loss follows the weights,
    assert skewed[1] == unweighted[1]  # the point map's does not


def test_gpu_preset_is_the_larger_model_under_30_mb() -> None:
    from refany3d.tiny import build_base_pipeline
    from refany3d.weights import add_refany3d_adapters

    config = preset_config("gpu", data=["d"], output_dir="o", num_workers=0)
    assert (config.batch_size, config.lora_rank, config.num_workers) == (128, 32, 0)
    pipe = build_base_pipeline(config.tiny)
    add_refany3d_adapters(pipe.transformer, config.lora_rank, config.lora_alpha)
    assert len(pipe.transformer.transformer_blocks) == len(pipe.transformer.single_transformer_blocks) == 4
    assert pipe.vae.config.latent_channels == 16 and pipe.transformer.config.in_channels == 64
    float32_bytes = 4 * sum(p.numel() for m in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_2)
                            for p in m.parameters())
    assert 20e6 < float32_bytes < 30e6, float32_bytes


def _run_benchmark(script: str, *args: str):
    import subprocess
    import sys

    return subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def _benchmark(script: str, *args: str) -> str:
    result = _run_benchmark(script, *args)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_benchmarks_report_bad_input_in_one_line(tmp_path: Path) -> None:
    for script, args, message in [
        ("quality.py", ["--data", str(tmp_path / "none")], f"error: {tmp_path / 'none'} is not a refany3d dataset"),
        ("reference_use.py", ["--data", str(tmp_path), "--times", "1.5"], "flow times (--times, --attention-time)"),
        ("sampler.py", ["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        ("sampler.py", ["--modes", "exact@layers"], "unknown sampler variant 'exact@layers'"),
    ]:
        result = _run_benchmark(script, *args)
        assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]
        assert "Traceback" not in result.stderr


def test_sampler_benchmark_times_offload_and_int8_beside_the_resident_model() -> None:
    out = _benchmark("sampler.py", "--configs", "tiny", "--views", "1", "--steps", "1", "--repeats", "1",
                     "--modes", "exact", "exact@model", "exact@blocks", "exact+int8", "exact+int8@blocks")

    def difference(variant: str) -> float:
        (line,) = [line for line in out.splitlines() if line.strip().startswith(f"{variant}:")]
        return float(re.search(r"vs exact: max\|d\| (\S+)", line).group(1))

    for grain in ("model", "blocks"):
        assert difference(f"exact@{grain}") < 1e-4  # the same output, only the weights' whereabouts differ
    for variant in ("exact+int8", "exact+int8@blocks"):  # int8 rounding of the weights moves it, a little
        assert 1e-5 < difference(variant) < 0.05, out


def test_train_memory_benchmark_finds_checkpointing_keeps_far_less() -> None:
    out = _benchmark("train_memory.py", "--heads", "1", "--resolution", "256", "--views", "4")
    rows = re.search(r"4 views \((\d+) rows\): plain +(\S+) GiB, --gradient-checkpointing +(\S+) GiB", out)
    assert rows, out
    assert int(rows.group(1)) == 512 + 10 * 16 ** 2  # T5's tokens and 2 + 2x4 branches of (256 / 8 / 2)² tokens
    plain, checkpointed = float(rows.group(2)), float(rows.group(3))
    assert 0 < checkpointed < plain / 4, out


def test_quality_and_reference_use_benchmarks_run_on_a_trained_model(trained: tuple[Path, dict], dataset: Path,
                                                                     tmp_path: Path) -> None:
    """The measurement scripts end to end on the tiny model, with and without the point-map branch."""
    out, _ = trained
    # sizes and views left out: the model's own, from the settings.json its training wrote (32 px, 2 views at 16)
    model = ["--data", str(dataset), "--base", str(out / "base"), "--ref", str(out / "ref"), "--count", "4"]
    _benchmark("quality.py", *model, "--steps", "2", "--fewer-views", "1", "--out", str(tmp_path / "full"))
    _benchmark("quality.py", *model, "--steps", "2", "--fewer-views", "--no-pointmap-branch", "--out", str(tmp_path / "ablation"))
    full = json.loads((tmp_path / "full" / "rows.json").read_text())["summary"]
    ablation = json.loads((tmp_path / "ablation" / "rows.json").read_text())["summary"]
    ceiling = full["held-out targets (ceiling)"]
    assert ceiling["fit_margin"] > 0  # the asset's renders fit its own targets better than another asset's
    paste = full["render-and-paste baseline"]  # aligned by construction
    assert paste["measurable"] == 1.0 and paste["iou"] > 0.9
    assert set(full) >= {"RefAny3D (2 views)", "RefAny3D (2 views), cached sampler", "RefAny3D, 1 view(s)"}
    (name,) = [k for k in ablation if k.startswith("RefAny3D")]
    assert name == "RefAny3D without point-map branch (2 views)"
    assert ablation[name]["iou"] is None and ablation[name]["measurable"] is None
    assert isinstance(ablation[name]["fit_psnr"], float)
    assert "n/a" in (tmp_path / "ablation" / "table.md").read_text()

    probe = _benchmark("reference_use.py", *model)
    assert "| 0.8 |" in probe and probe.count(" / ") >= 4  # RGB / point-map losses
    probe = _benchmark("reference_use.py", *model, "--no-pointmap-branch")
    rows = [line for line in probe.splitlines() if line.startswith("| 0.8 |")]
    assert rows and " / " not in rows[0]  # one target: RGB losses only


def test_quality_medians_count_a_failed_sample_as_the_worst():
    """A sample with no camera recovered has no IoU; leaving it out of the median would hide the
    failures, so it counts as the worst value, and a median that lands on one reads as failed."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("quality", REPO / "benchmarks" / "quality.py")
    quality = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(quality)
    row = lambda **values: {**dict.fromkeys(quality.METRICS), **values}  # noqa: E731
    scored = row(measurable=True, iou=0.9, reprojection_error_px=1.0)
    failed = row(measurable=False)
    summary = quality.summarize([scored, row(measurable=True, iou=0.5, reprojection_error_px=3.0), failed])
    assert summary["iou"] == 0.5 and summary["reprojection_error_px"] == 3.0  # not 0.7 and 2.0
    assert summary["iou_scored"] == 2 and summary["measurable"] == pytest.approx(2 / 3)
    mostly_failed = quality.summarize([scored, failed, failed])
    assert mostly_failed["iou"] is None and mostly_failed["iou_scored"] == 1
    assert quality.summarize([failed])["image_iou"] is None
