"""The three training stages as data: one record per stage, read by train.py, thinkrec.train (what trains),
infer.py and the loaded run (prompts, gate), and the experiments (which stages can be shared between runs).

    stage   trains      prompt  CF tokens  routed  own rate flag   what it adds
    stage1  global      text    no         no      -               the global LoRA (adapter 0, every layer)
    stage2  projector   ids     yes        no      --stage2-lr     the CF projector, LoRA frozen
    stage3  experts     ids     yes        yes     --stage3-lr     the experts (last layers' LoRA), per group

Adding a stage, or changing a stage's prompt or routing, is an edit of this table (and, for a new kind of
`trains`, of thinkrec.train.stages.setup). Nothing else compares stage names.
"""

from dataclasses import dataclass


@dataclass(frozen=True)
class Stage:
    name: str  # its run directory, RUN/<name>/
    trains: str  # "global" (adapter 0), "projector" (the CF projector) or "experts" (adapters 1..N)
    prompt: str  # the prompt mode of its plain training samples (thinkrec.data.prompts.MODES)
    cf_tokens: bool  # its prompts, validation included, carry CF id slots (so its saved projector is trained)
    routed: bool  # rows go to their group's expert (the gate) rather than to the global adapter
    lr_flag: str | None  # the train.py flag (argparse dest) that sets its own learning rate over --lr
    follows_lr: bool = True  # under a recipe schedule, --lr sets its rate (False: the schedule's own rate)

    def prompt_in(self, recipe) -> str:
        """The prompt mode of its plain samples under `recipe` (thinkrec.recipe.Recipe): the official recipe
        trains its experts on stage 1's prompt (recipe.stage3_prompt)."""
        return recipe.stage3_prompt if self.trains == "experts" else self.prompt


TABLE = (
    Stage("stage1", trains="global", prompt="text", cf_tokens=False, routed=False, lr_flag=None),
    Stage("stage2", trains="projector", prompt="ids", cf_tokens=True, routed=False, lr_flag="stage2_lr"),
    Stage("stage3", trains="experts", prompt="ids", cf_tokens=True, routed=True, lr_flag="stage3_lr",
          follows_lr=False),
)
STAGES = tuple(s.name for s in TABLE)  # the order they train in
BY_NAME = {s.name: s for s in TABLE}


def up_to(last: str) -> tuple:
    """The stages a run with --last-stage `last` trains, in order."""
    return TABLE[:STAGES.index(get(last).name) + 1]


def get(name: str) -> Stage:
    if name not in BY_NAME:
        raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
    return BY_NAME[name]
