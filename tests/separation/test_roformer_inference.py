"""RoFormer inference against MSST's `demix` (generic mode), streamed and through the
engine: the same estimates at every length and batch size, stems that add up to the
input, flat memory, precisions."""
from __future__ import annotations

import collections
import dataclasses

import numpy as np
import pytest
import soundfile as sf
import torch

from demix.audio.io import AudioReader, dequantize, quantize
from demix.errors import SeparationFailed
from testkit.memory_sink import MemorySink, separate, snr_db
from testkit.synthetic_audio import write_wav
from tests.support.precision import assert_bf16_close_to_fp32, assert_falls_back_to_fp32, assert_gpu_close_to_cpu
from tests.roformer_fixtures import (ARCHITECTURES, LENGTH_BATCH_SIZES, LENGTH_CASES, length_arrays, reference_arrays,
                                     reference_model, small_checkpoint_path, small_config_path)
from demix.separation import forward as forward_module
from demix.separation import mix_io
from demix.separation.engine import separate_file
from demix.separation.forward import plain_forward
from demix.separation.mix_io import BLOCK_FRAMES
from demix.separation.roformer import build_model, load_model, read_config
from demix.separation.roformer.inference import (demix_stream, fade_window, network_runner, window_count,
                                                 windows_per_forward)

# Each runs a separation model over audio (seconds each): outside the fast set.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=ARCHITECTURES)
def architecture(request) -> str:
    return request.param


@pytest.fixture(scope="module")
def model(architecture):
    return reference_model(architecture)


@pytest.fixture(scope="module")
def bs_model():
    return reference_model("bs_roformer")


@pytest.mark.parametrize("case, block_frames", [("long", 777), ("long", BLOCK_FRAMES), ("short", 1000),
                                                ("tiny", 4096)])
def test_the_stream_gives_msst_demix_output(model, architecture, case, block_frames):
    arrays = reference_arrays(architecture)
    mix = torch.from_numpy(arrays[f"demix_{case}_input"])
    blocks = [mix[:, start:start + block_frames] for start in range(0, mix.shape[-1], block_frames)]
    run = network_runner(model, range(len(model.sources)), plain_forward)
    windows: list[int] = []
    estimate = torch.cat(list(demix_stream(blocks, run, model.chunk_size, model.num_overlap,
                                           on_window=lambda: windows.append(1))), dim=-1).numpy()
    expected = arrays[f"demix_{case}_output"]
    assert estimate.shape == expected.shape
    assert np.abs(estimate - expected).max() < 1e-5
    assert len(windows) == window_count(mix.shape[-1], model.chunk_size, model.num_overlap)


@pytest.mark.parametrize("batch_size", LENGTH_BATCH_SIZES)
@pytest.mark.parametrize("case", LENGTH_CASES)
def test_the_stream_gives_msst_demix_output_at_every_length_and_batch_size(model, architecture, case, batch_size):
    """Shorter than half a window, than a window, exactly one, between one and two
    borders, exactly two, longer; MSST's batches of 1 and of 4 (its published configs'),
    whose fades differ at the ends (see `demix.separation.roformer.inference`); a batch
    in one forward, as MSST runs it, from blocks shorter than a step."""
    arrays = length_arrays(architecture)
    chunk_size, num_overlap = int(arrays["chunk_size"]), int(arrays["num_overlap"])
    mix = torch.from_numpy(arrays[f"input_{case}"])
    blocks = [mix[:, start:start + 97] for start in range(0, mix.shape[-1], 97)]
    run = network_runner(model, range(len(model.sources)), plain_forward)
    batches: list[int] = []

    def counting_run(windows: torch.Tensor) -> torch.Tensor:
        batches.append(len(windows))
        return run(windows)

    estimate = torch.cat(list(demix_stream(blocks, counting_run, chunk_size, num_overlap, batch_size=batch_size)),
                         dim=-1).numpy()
    expected = arrays[f"output_{case}_batch{batch_size}"]
    assert estimate.shape == expected.shape
    assert np.abs(estimate - expected).max() < 1e-5
    windows = window_count(mix.shape[-1], chunk_size, num_overlap)
    assert batches == [batch_size] * (windows // batch_size) + [windows % batch_size] * (windows % batch_size > 0)


def test_a_whole_file_through_the_engine_gives_msst_demix_output(model, architecture, tmp_path):
    arrays = reference_arrays(architecture)
    path = tmp_path / "in.wav"
    sf.write(str(path), arrays["demix_long_input"].T, 44100, subtype="FLOAT")
    sink = separate(model, path)
    # `all` of a one-source model is the source and its complement (demix.stems.output_names).
    assert sink.published == (list(model.sources) if len(model.sources) > 1 else [model.sources[0],
                                                                                 f"no_{model.sources[0]}"])
    for index, name in enumerate(model.sources):
        assert sink.formats[name] == (44100, 2, "FLOAT", arrays["demix_long_input"].shape[1])
        assert np.abs(sink.stem(name).T - arrays["demix_long_output"][index]).max() < 1e-4


@pytest.mark.parametrize("batch_size", LENGTH_BATCH_SIZES)
@pytest.mark.parametrize("case", LENGTH_CASES)
def test_the_engine_gives_msst_demix_output_with_the_configs_batch_size(architecture, case, batch_size, tmp_path):
    """An MSST config with that window and batch size, read as `demix models add` keeps it,
    through the engine: MSST's `demix` of the same config (the issue's case is Kim's config,
    num_overlap 2 and batch_size 4, on a clip of exactly one window)."""
    arrays = length_arrays(architecture)
    config = small_config_path(architecture).read_text(encoding="utf-8")
    config = config.replace("chunk_size: 11008", f"chunk_size: {int(arrays['chunk_size'])}")
    config = config.replace("batch_size: 1", f"batch_size: {batch_size}")
    (tmp_path / "config.yaml").write_text(config, encoding="utf-8")
    model = load_model(small_checkpoint_path(architecture), tmp_path / "config.yaml")
    mix = arrays[f"input_{case}"]
    sf.write(str(tmp_path / "in.wav"), mix.T, 44100, subtype="FLOAT")
    forwards: list[int] = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(len(args[0])))
    sink = separate(model, tmp_path / "in.wav")
    # On a CPU the windows of a batch run one per forward (windows_per_forward).
    assert forwards == [1] * window_count(mix.shape[-1], model.chunk_size, model.num_overlap)
    for index, name in enumerate(model.sources):
        assert np.abs(sink.stem(name).T - arrays[f"output_{case}_batch{batch_size}"][index]).max() < 1e-5


@pytest.mark.parametrize("per_forward, forwards", [(None, [5]), (1, [1] * 5), (2, [2, 2, 1])])
def test_a_batch_runs_in_forwards_of_the_given_size(bs_model, per_forward, forwards):
    windows = torch.from_numpy(reference_arrays("bs_roformer")["network_input"]).repeat(5, 1, 1)
    windows = windows * torch.linspace(0.5, 1.5, 5)[:, None, None]
    seen: list[int] = []
    run = network_runner(bs_model, [1, 0], lambda model, stack: seen.append(len(stack)) or model(stack), per_forward)
    estimate = run(windows)
    with torch.inference_mode():
        expected = torch.stack([bs_model(window[None])[0] for window in windows]).flip(1)
    assert seen == forwards
    assert estimate.shape == (5, 2, 2, windows.shape[-1])
    assert torch.allclose(estimate, expected, atol=1e-6)


def test_windows_stack_per_forward_on_a_gpu_only():
    assert windows_per_forward(4, "cpu") == 1
    assert windows_per_forward(4, "cuda") == windows_per_forward(4, "cuda:1") == 4


def test_the_fade_window_is_msst_linear_fade():
    window = fade_window(100)
    assert torch.equal(window[:10], torch.linspace(0, 1, 10)) and torch.equal(window[-10:], torch.linspace(1, 0, 10))
    assert torch.equal(window[10:-10], torch.ones(80))


def test_an_empty_stream_gives_nothing(bs_model):
    run = network_runner(bs_model, [0], plain_forward)
    assert list(demix_stream(iter([]), run, bs_model.chunk_size, bs_model.num_overlap)) == []


@pytest.mark.parametrize("subtype, channels", [("PCM_16", 1), ("PCM_16", 2), ("PCM_24", 2), ("PCM_16", 3)])
def test_a_stem_and_the_rest_add_up_to_the_input_exactly(bs_model, tmp_path, subtype, channels):
    path = write_wav(tmp_path / "in.wav", 44100, channels, seconds=0.3, subtype=subtype)
    sink = separate(bs_model, path, stems="other")
    assert sink.published == ["other", "no_other"]
    mix, _ = sf.read(str(path), dtype="float32", always_2d=True)
    stem, rest = (np.concatenate(sink.blocks[name]) for name in ("other", "no_other"))
    assert stem.shape == mix.shape
    assert np.array_equal(stem + rest, quantize(mix, subtype))
    assert np.abs(dequantize(stem, subtype)).max() > 0.01


def test_another_rate_is_separated_at_the_models_rate_and_written_at_the_inputs(bs_model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 22050, 2, seconds=0.3, subtype="FLOAT")
    sink = separate(bs_model, path, stems="vocals")
    assert sink.formats["vocals"] == (22050, 2, "FLOAT", 6615)
    assert sink.written("vocals") == sink.written("no_vocals") == 6615


def test_a_source_the_model_lacks_fails_with_a_message(bs_model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.2)
    with pytest.raises(SeparationFailed, match="model has no source 'drums'; it separates vocals, other"):
        separate(bs_model, path, stems="drums")


def test_progress_rises_to_one_over_the_windows(bs_model, tmp_path):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.5)
    seen: list[float] = []
    separate_file(bs_model, path, "all", MemorySink(), progress=seen.append)
    assert len(seen) >= window_count(22050, bs_model.chunk_size, bs_model.num_overlap)
    assert seen == sorted(seen) and seen[-1] == 1.0


@pytest.mark.parametrize("batch_size, seconds", [(1, 4.0), (4, 6.0)])
def test_the_input_is_read_a_bounded_distance_ahead_of_the_written_stems(tmp_path, monkeypatch, batch_size, seconds):
    """Memory stays flat: no read of the input gets more than a batch of windows and two
    blocks ahead of what every stem has written (a narrower network and shorter blocks
    than the service's keep this quick; the bound scales with them)."""
    config = read_config(small_config_path("bs_roformer"))
    narrow = dict(config.model, dim=8, depth=1, linear_transformer_depth=0, mlp_expansion_factor=1)
    bs_model = build_model(dataclasses.replace(config, model=narrow, num_overlap=2, batch_size=batch_size))
    monkeypatch.setattr(mix_io, "BLOCK_FRAMES", 8192)
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=seconds)
    sink = MemorySink()
    positions: dict[int, int] = collections.defaultdict(int)
    leads: dict[int, list[int]] = collections.defaultdict(list)
    read = AudioReader.read

    def recording_read(reader: AudioReader, frames: int) -> np.ndarray:
        block = read(reader, frames)
        positions[id(reader)] += len(block)
        written = min(sink.written(name) for name in ("vocals", "no_vocals"))
        leads[id(reader)].append(positions[id(reader)] - written)
        return block

    monkeypatch.setattr(AudioReader, "read", recording_read)
    separate_file(bs_model, path, "vocals", sink)
    assert len(leads) == 2  # the input is read once through the model, once for no_vocals
    step = bs_model.chunk_size // bs_model.num_overlap
    bound = bs_model.chunk_size + (batch_size - 1) * step + 2 * 8192
    assert all(max(lead) <= bound for lead in leads.values())
    assert bound < 44100 * seconds / 5


def test_bf16_runs_close_to_fp32(model, tmp_path, monkeypatch):
    # The bf16 copy runs even on a CPU without bf16 kernels (slowly: the model is small).
    monkeypatch.setattr(forward_module, "cpu_supports_bf16", lambda: True)
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.3, subtype="FLOAT")
    assert_bf16_close_to_fp32(model, path)


def test_bf16_on_a_cpu_without_bf16_kernels_warns_and_runs_in_fp32(bs_model, tmp_path, monkeypatch):
    monkeypatch.setattr(forward_module, "cpu_supports_bf16", lambda: False)
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=0.3, subtype="FLOAT")
    assert_falls_back_to_fp32(bs_model, path, "bf16", "no bf16 kernels", "vocals")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_the_network_runs_under_autocast_close_to_fp32(model, dtype):
    """What the CUDA path does (`ModelForward` runs the fp32 model under autocast); here
    on the CPU, which autocasts the same layers."""
    audio = torch.from_numpy(reference_arrays(model.config.architecture)["network_input"])
    with torch.inference_mode():
        fp32 = model(audio)
        with torch.autocast("cpu", dtype=dtype):
            mixed = model(audio)
    assert mixed.dtype == torch.float32
    assert 20 < snr_db(fp32.numpy(), mixed.numpy()) < 200


@pytest.mark.requires_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16", "fp16"])
def test_a_gpu_separates_close_to_the_cpu(model, tmp_path, precision):
    path = write_wav(tmp_path / "in.wav", 44100, 2, seconds=1.5, subtype="FLOAT")
    assert_gpu_close_to_cpu(model, path, precision)


def test_a_mono_network_separates_each_channel_on_its_own():
    from demix.separation.roformer import BSRoformer

    torch.manual_seed(0)
    mono = BSRoformer(16, depth=1, stereo=False, num_stems=2, freqs_per_bands=(64, 65), stft_n_fft=256,
                      stft_hop_length=64, stft_win_length=256, dim_head=8, heads=2).eval()
    windows = torch.randn(3, 2, 1280)
    estimate = network_runner(mono, [1], plain_forward)(windows)
    with torch.inference_mode():
        expected = torch.stack([torch.cat([mono(window[channel:channel + 1][None])[0, 1] for channel in range(2)])
                                for window in windows])
    assert estimate.shape == (3, 1, 2, 1280)
    assert torch.allclose(estimate[:, 0], expected, atol=1e-6)
