"""The training loop: exact resume, DDP equivalence, checkpoints, bad data."""
import csv
import os

import pytest
import torch
import torch.multiprocessing as mp

from fastgen_sci import checkpoint
from fastgen_sci.methods.sft import SFT
from fastgen_sci.train import Trainer, read_metrics


def toy_setup(n_train=512, dropout=0.0):
    from fastgen_sci.domains.toy import ToyPack
    pack = ToyPack(hidden=32, depth=2, n_train=n_train, dropout=dropout)
    return pack, SFT(lr=1e-3).players(student=pack.teacher_network())


def losses(run_dir):
    return [r["loss/student"] for r in read_metrics(run_dir)]


def quiet(**kw):
    return Trainer(progress_bar=False, tensorboard=False, **kw)


def test_resume_repeats_the_uninterrupted_run(tmp_path):
    pack, players = toy_setup(dropout=0.1)
    quiet(iterations=30, batch_size=32, checkpoint_every=10).fit(players, pack.dataset(), tmp_path / "straight")
    straight = losses(tmp_path / "straight")

    pack, players = toy_setup(dropout=0.1)
    quiet(iterations=17, batch_size=32, checkpoint_every=10).fit(players, pack.dataset(), tmp_path / "resumed")
    # the 'crash' after iteration 17 leaves a checkpoint at 10 and log rows up to 17
    assert [c.name for c in checkpoint.complete(tmp_path / "resumed" / "checkpoints")] == ["iter-00000010", "iter-00000017"]
    import shutil
    shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "iter-00000017")
    pack, players = toy_setup(dropout=0.1)
    summary = quiet(iterations=30, batch_size=32, checkpoint_every=10).fit(players, pack.dataset(), tmp_path / "resumed")
    assert summary["resumed_from"] == 10
    assert losses(tmp_path / "resumed") == straight  # bit-identical, rows 10..16 rewritten once
    assert len(straight) == 30


def test_checkpoint_survives_a_crash_mid_write_and_reports_corruption(tmp_path):
    pack, players = toy_setup()
    quiet(iterations=4, batch_size=16, checkpoint_every=2).fit(players, pack.dataset(), tmp_path)
    ckpts = tmp_path / "checkpoints"
    (ckpts / ".iter-00000006.tmp").mkdir()  # a write that never finished is ignored
    assert checkpoint.complete(ckpts)[-1].name == "iter-00000004"
    (ckpts / "iter-00000004" / "weights.safetensors").write_bytes(b"not a safetensors file")
    pack, players = toy_setup()
    with pytest.raises(checkpoint.CheckpointError, match="iter-00000004.*weights.safetensors"):
        quiet(iterations=6, batch_size=16).fit(players, pack.dataset(), tmp_path)


def test_wrong_checkpoint_names_the_mismatch(tmp_path):
    pack, players = toy_setup()
    path = checkpoint.save_weights(players[0].module, tmp_path / "w.safetensors")
    from fastgen_sci.domains.toy import ToyPack
    other = ToyPack(hidden=48, depth=2).teacher_network()
    with pytest.raises(ValueError, match="expected .*48.*found .*32"):
        checkpoint.load_weights(other, path)


def test_nan_in_data_stops_with_a_clear_error(tmp_path):
    pack, players = toy_setup()
    data = pack.dataset()
    data.x[:] = float("nan")
    with pytest.raises(FloatingPointError, match="player 'student' loss is nan at iteration 0"):
        quiet(iterations=2, batch_size=16).fit(players, data, tmp_path)


def test_ema_halflife():
    tr = quiet(batch_size=100, ema_halflife_images=1000, ema_rampup=None)
    assert abs(tr._ema_beta(0) ** 10 - 0.5) < 1e-12  # 10 steps of 100 images halve the old weight




def _ddp_worker(rank, world, port, out):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    pack, players = toy_setup()
    quiet(iterations=1, batch_size=16, device="cpu").fit(players, pack.dataset(), out)
    if rank == 0:
        torch.save({k: v.clone() for k, v in players[0].module.state_dict().items()}, os.path.join(out, "params.pt"))
    torch.distributed.destroy_process_group()


def test_two_process_ddp_takes_the_same_first_step_as_one_process(tmp_path, free_port):
    pack, players = toy_setup()
    before = {k: v.clone() for k, v in players[0].module.state_dict().items()}
    quiet(iterations=1, batch_size=16, device="cpu").fit(players, pack.dataset(), tmp_path / "single")
    single = players[0].module.state_dict()

    mp.start_processes(_ddp_worker, args=(2, free_port, str(tmp_path / "ddp")), nprocs=2, start_method="spawn")
    ddp = torch.load(tmp_path / "ddp" / "params.pt", weights_only=True)
    moved = [k for k in single if not torch.equal(before[k], single[k])]
    assert moved  # the step changed the weights
    for k in single:
        torch.testing.assert_close(ddp[k], single[k], rtol=1e-5, atol=1e-6)
    assert losses(tmp_path / "ddp") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_mixed_precision_paths_train(tmp_path, precision):
    """Autocast (and loss scaling for fp16) run end to end; on CPU this exercises the same code as on GPU."""
    pack, players = toy_setup()
    before = [p.clone() for p in players[0].module.parameters()]
    quiet(iterations=3, batch_size=16, precision=precision).fit(players, pack.dataset(), tmp_path)
    assert all(torch.isfinite(torch.tensor(losses(tmp_path))))
    assert any(not torch.equal(a, b) for a, b in zip(before, players[0].module.parameters()))
