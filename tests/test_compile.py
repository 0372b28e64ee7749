"""``torch.compile`` of the whole model on a CPU: it matches eager through a teacher-temperature warm-up,
with the centres updated in place, and the warm-up does not recompile it.

``aot_eager`` runs dynamo and AOTAutograd (functionalisation, where in-place buffer updates and
graph inputs are decided) without generating C++; a compile counter wraps it.
"""

import torch
import torch._dynamo
from conftest import TINY_RUN
from data_fixtures import write_parquet
from torch._dynamo.testing import CompileCounterWithBackend

from hf_koleo.training.arguments import parse_pretraining_args
from hf_koleo.training.checkpoint import TrainerState
from hf_koleo.training.optimization import apply_schedules, schedule_values
from hf_koleo.training.run_setup import build_run
from hf_koleo.training.trainer import NonFiniteGuard, train_step

STEPS = 4


def test_the_compiled_model_matches_eager_through_a_temperature_warmup_without_recompiling(tmp_path):
    data = write_parquet(tmp_path / "data.parquet", 48)
    arguments, model_config = parse_pretraining_args(
        [*TINY_RUN, "--data", str(data), "--output_dir", str(tmp_path / "run")]
        + ["--teacher_temperature_start", "0.04", "--teacher_temperature", "0.07"]
        + ["--teacher_temperature_warmup_epochs", "1", "--model.ibot_loss_weight", "0"]
    )
    eager, compiled = (build_run(arguments, model_config, resume=False) for _ in range(2))  # same seed: twins
    torch._dynamo.reset()
    counter = CompileCounterWithBackend("aot_eager")
    compiled.unwrapped.compile(backend=counter)
    centre = compiled.unwrapped.cls_centre
    frames, temperatures, losses = [], [], []
    for run in (eager, compiled):
        state, guard = TrainerState(), NonFiniteGuard()
        for step in range(STEPS):
            values = schedule_values(arguments, step, 100, float(STEPS), 1e-3)  # one epoch of warm-up
            apply_schedules(run.optimizer, values)
            batch = run.data.next_batch(state)
            output = train_step(run.accelerator, run.model, run.optimizer, batch, values, step, 3.0, guard)
            run.unwrapped.update_teacher(values.teacher_momentum)
            if run is compiled:
                frames.append(counter.frame_count)
                temperatures.append(values.teacher_temperature)
        losses.append(output.loss.detach())
    assert len(set(temperatures)) == STEPS  # the temperature changed at every step ...
    assert frames[0] > 0 and frames == [frames[0]] * STEPS, frames  # ... and nothing was compiled again
    assert compiled.unwrapped.cls_centre is centre and centre.abs().sum() > 0  # updated in place
    torch.testing.assert_close(compiled.unwrapped.cls_centre, eager.unwrapped.cls_centre, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-4, atol=1e-6)
    for (name, parameter), twin in zip(compiled.unwrapped.named_parameters(), eager.unwrapped.parameters()):
        torch.testing.assert_close(parameter, twin, rtol=1e-4, atol=1e-5, msg=name)
