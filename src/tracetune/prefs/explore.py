"""Step-wise exploration (Pref-X): K candidates per step, each executed on its own branch.

For each task the policy advances one step at a time. At every step, from the best prefix
so far, it samples K candidate actions with the configured temperature schedule (by default
one sample at the low temperature and K-1 at the high one). Each candidate is applied on
its **own fork** of the prefix's episode (a forked sandbox for code actions), so side
effects never leak between candidates. A step verifier ranks the executed candidates; the
best one's branch becomes the new prefix; the episode goes on until a final answer or a
budget.

The output is a Trajectory dataset: each record is the committed path, and
``metadata["exploration"]`` holds every step's candidates (steps with observations), the
temperature each was sampled at, and the verifier's ranking with reasons.
``tracetune prefs build`` turns them into preference pairs.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from tracetune.agent.loop import Agent, Episode
from tracetune.cliflag import CliFlag
from tracetune.errors import InputFileError
from tracetune.inputs import InputError
from tracetune.models.base import ChatModel, ModelOptions, Sampling, load_model
from tracetune.prefs.base import (
    Candidate,
    StepContext,
    apply_step,
    close_branch,
    fork_episode,
    track_files,
)
from tracetune.prefs.memo import DETERMINISTIC, MemoTool, memoized
from tracetune.prefs.verifiers import VERIFIERS, StepVerifier, make_verifier, prompts_hash
from tracetune.runner import MeteredModel, StageResult, run_stage
from tracetune.schema import Task, Trajectory, Usage
from tracetune.stageoptions import StageOptions
from tracetune.store import AssetStore, Dataset
from tracetune.store.tasks import load_tasks
from tracetune.tools import load_tools

STAGE = "explore"
STOP = ("\nObservation:",)


class ExploreConfig(StageOptions):
    """Configuration of ``tracetune prefs explore`` (YAML keys are these field names)."""

    tasks: Path = Field(description="Task dataset directory (or JSONL) to explore on.")
    out: Path = Field(description="Output directory of explored trajectories (resumable).")
    policy: str = Field(
        description="Policy spec: 'local:DIR' (e.g. the SFT output) or "
        "'openai:NAME' (e.g. a vLLM endpoint serving it)."
    )
    verifier: str = Field(default="gold", description=f"Step verifier: {', '.join(VERIFIERS)}.")
    judge: str | None = Field(
        default=None, description="Judge model spec for llm-* verifiers (with 'gold' it audits)."
    )
    k: int = Field(default=5, ge=1, description="Candidates sampled per step.")
    low_temperature: float = Field(
        default=0.7, ge=0, description="Temperature of the first `low_samples` candidates."
    )
    high_temperature: float = Field(default=1.2, ge=0, description="Temperature of the rest.")
    low_samples: int = Field(default=1, ge=0, description="Candidates at the low temperature.")
    temperatures: list[float] | None = Field(
        default=None,
        description="Explicit per-candidate temperatures (length k); overrides the schedule.",
    )
    top_p: float = Field(default=0.8, gt=0, le=1, description="Nucleus sampling top-p.")
    max_tokens: int = Field(default=512, ge=1, description="Max new tokens per candidate.")
    max_steps: int = Field(default=8, ge=1, description="Step budget per episode.")
    max_errors: int = Field(default=3, ge=1, description="Failed committed steps allowed.")
    action_format: Literal["json", "code", "tools"] = Field(
        default="json", description="How the policy writes actions."
    )
    seed: int | None = Field(
        default=0,
        description="Base sampling seed (per task and step), where the backend "
        "supports seeds; None samples freshly each run.",
    )
    gold_anchor: bool = Field(
        default=False,
        description="Task programs only: also offer the gold chain's next step as a candidate "
        "(recorded as source 'gold'), so steps where a weak policy samples nothing usable "
        "still give a pair against its samples.",
    )
    memo_tools: list[str] = Field(
        default_factory=lambda: list(DETERMINISTIC),
        description="Deterministic tools whose result is reused when candidates of one task "
        "make the same call on the same file contents (e.g. K identical OCR calls run once).",
    )
    judge_retries: int = Field(default=2, ge=0, description="Retries of a malformed judge reply.")
    tool_modules: list[str] = Field(
        default_factory=list, description="Python modules to import first (they register tools)."
    )
    corpus: Path | None = Field(
        default=None, description="Search corpus for tasks that use search (default: the task's)."
    )
    judge_backend: Annotated[ModelOptions, CliFlag(skip=True)] = Field(
        default_factory=ModelOptions, description="Judge backend options (CLI: --judge-base-url)."
    )

    @model_validator(mode="after")
    def _check(self) -> ExploreConfig:
        if self.verifier not in VERIFIERS:
            raise ValueError(f"verifier must be one of {', '.join(VERIFIERS)}")
        if "llm-" in self.verifier and not self.judge:
            raise ValueError(f"verifier {self.verifier} needs a judge model (judge: SPEC)")
        if self.temperatures is not None and len(self.temperatures) != self.k:
            raise ValueError(
                f"temperatures has {len(self.temperatures)} entries but k is {self.k}; give "
                "one temperature per candidate"
            )
        return self

    def schedule(self) -> list[float]:
        """The temperature of each of the K candidates."""
        if self.temperatures is not None:
            return list(self.temperatures)
        low = min(self.low_samples, self.k)
        return [self.low_temperature] * low + [self.high_temperature] * (self.k - low)


def explore_id(task: Task, config: ExploreConfig, policy: str) -> str:
    """Stable id of a task's exploration, so a rerun skips it."""
    blob = "|".join(
        str(x)
        for x in (
            task.id,
            policy,
            config.verifier,
            config.judge,
            config.k,
            config.schedule(),
            config.action_format,
            config.seed,
            *(["gold-anchor"] if config.gold_anchor else []),
        )
    )
    return "explore-" + hashlib.sha256(blob.encode()).hexdigest()[:16]


def _seed(base: int | None, task_id: str, step: int, group: int, attempt: int = 0) -> int | None:
    if base is None:
        # No seed, except on a repeated request: without one it would be answered from the
        # response cache with the same sample.
        return secrets.randbits(31) if attempt else None
    blob = f"{base}|{task_id}|{step}|{group}" + (f"|{attempt}" if attempt else "")
    return int.from_bytes(hashlib.sha256(blob.encode()).digest()[:4], "big")


class Explorer:
    """Explores one task at a time with a policy, a verifier and a temperature schedule."""

    def __init__(self, agent: Agent, verifier: StepVerifier, config: ExploreConfig) -> None:
        self.agent = agent
        self.verifier = verifier
        self.config = config

    async def sample(self, episode: Episode, task_id: str) -> list[tuple[str, float, Any]]:
        """K candidate outputs for the episode's next step: (text, temperature, generation)."""
        config = self.config
        groups: dict[float, int] = {}
        for t in config.schedule():
            groups[t] = groups.get(t, 0) + 1
        messages = episode.messages()
        drawn: dict[float, list[tuple[str, float, Any]]] = {}
        for g, (temperature, count) in enumerate(groups.items()):
            out: list[tuple[str, float, Any]] = []
            drawn[temperature] = out
            texts: list[str] = []
            attempt = 0
            # Endpoints that ignore n (some servers answer one choice) are asked again, one
            # sample at a time with a fresh seed, until the schedule's count is met.
            while len(texts) < count and attempt <= count:
                seed = _seed(config.seed, task_id, len(episode.steps), g, attempt)
                sampling = Sampling(
                    temperature=temperature,
                    top_p=config.top_p,
                    max_tokens=config.max_tokens,
                    stop=STOP,
                    seed=seed,
                )
                want = count - len(texts)
                generation = await self.agent.model.generate(
                    messages, n=want, sampling=sampling, tools=episode.tool_schemas()
                )
                for completion in generation.completions[:want]:
                    text = episode.fmt.raw(completion)
                    texts.append(text)
                    out.append((text, temperature, generation))
                attempt += 1
            if len(texts) < count:
                raise RuntimeError(
                    f"{self.agent.model.spec} returned {len(texts)} completions where {count} "
                    "were asked for"
                )
        # One request per temperature, but candidates in the schedule's order: ties are
        # broken by candidate index, and `temperatures` names each candidate's own.
        return [drawn[t].pop(0) for t in config.schedule()]

    async def explore(
        self, task: Task, source: AssetStore, assets: AssetStore, record_id: str
    ) -> Trajectory:
        config = self.config
        started_at, t0 = time.time(), time.monotonic()
        base = self.agent
        # This task's own agent: its memoized tools remember results for this task only.
        agent = Agent(
            base.model,
            memoized(base.tools, config.memo_tools),
            base.fmt.name,
            base.max_steps,
            base.max_errors,
            base.sampling,
            base.tool_options,
            base.tool_model,
        )
        root = await agent.start(task, source, assets)
        # Every branch gets its own files: code may write any, and JSON tools name the
        # images they save by tool and step only, so candidates would overwrite each other's.
        workspace = track_files(root)
        current = root
        entries: list[dict[str, Any]] = []
        usage = Usage()
        status = "max_steps"
        branches: list[Episode] = []
        try:
            for _ in range(config.max_steps):
                samples = await self.sample(current, task.id)
                candidates: list[Candidate] = []
                counted: set[int] = set()
                for i, (text, temperature, generation) in enumerate(samples):
                    if id(generation) not in counted:  # one call made several candidates
                        counted.add(id(generation))
                        usage = usage.add(generation.usage)
                    branch = await fork_episode(current)
                    branches.append(branch)
                    step = await apply_step(branch, text, None, generation.latency_s)
                    candidates.append(Candidate(i, step, temperature, branch))
                if config.gold_anchor and task.gold_chain and task.gold is not None:
                    branch = await fork_episode(current)
                    branches.append(branch)
                    step = await apply_step(branch, gold_next_step(task, current, config.seed or 0))
                    candidates.append(Candidate(len(candidates), step, None, branch, "gold"))
                context = StepContext(
                    task=task,
                    prefix=list(current.steps),
                    candidates=candidates,
                    action_format=self.agent.fmt.name,
                    tool_names=[t.name for t in self.agent.tools],
                    resolve=current._resolve,
                )
                ranking = await self.verifier.rank(context)
                usage = usage.add(ranking.usage)
                best = candidates[ranking.best]
                entries.append(
                    {
                        "index": len(current.steps),
                        "candidates": [
                            {
                                "step": c.step.model_dump(mode="json"),
                                "temperature": c.temperature,
                                "fault": c.fault,
                                "source": c.source,
                            }
                            for c in candidates
                        ],
                        "chosen": ranking.best,
                        "ranking": ranking.model_dump(mode="json"),
                    }
                )
                for c in candidates:
                    if c is not best:
                        await close_branch(c.branch)
                if current is not root:
                    await close_branch(current)
                current = best.branch
                if current.final_answer is not None:
                    status = "completed"
                    break
                if best.step.error is not None and current.errors >= config.max_errors:
                    status = "max_errors"
                    break
        finally:
            for branch in branches:
                await close_branch(branch)
            await root.close()
            workspace.cleanup()
        return Trajectory(
            id=record_id,
            task=task,
            controller=self.agent.model.spec,
            action_format=self.agent.fmt.name,
            tools=[t.name for t in self.agent.tools],
            steps=current.steps,
            final_answer=current.final_answer,
            status=status,  # type: ignore[arg-type]
            usage=usage,
            started_at=started_at,
            duration_s=time.monotonic() - t0,
            prompt_hash=self.agent.fmt.prompt_hash,
            sampling={
                "schedule": config.schedule(),
                "top_p": config.top_p,
                "max_tokens": config.max_tokens,
                "seed": config.seed,
            },
            metadata={
                "exploration": entries,
                "verifier": getattr(self.verifier, "name", config.verifier),
                "judge": config.judge,
                "judge_prompt_hash": prompts_hash() if config.judge else None,
                "k": config.k,
                "tool_memo_hits": sum(t.hits for t in agent.tools if isinstance(t, MemoTool)),
            },
        )


def gold_next_step(task: Task, episode: Episode, seed: int) -> str:
    """The gold chain's next call after the episode's steps (or its final answer), written
    as the gold teacher of ``tracetune rollout`` writes it."""
    from tracetune.prefs.verifiers import gold_matches
    from tracetune.rollout import Thoughts, answer_from_outputs, code_for, resolve_produced
    from tracetune.schema import Action

    matched = gold_matches(task, episode.steps)
    thoughts = Thoughts(seed, task.id)
    prev = task.gold_chain[len(matched) - 1] if matched else None
    if len(matched) < len(task.gold_chain):
        j = len(matched)
        call = task.gold_chain[j]
        note = (task.metadata.get("gold_steps") or [{}] * (j + 1))[j] or {}
        thought = thoughts.step(j, call, note.get("purpose", ""), prev)
        if episode.fmt.name == "code":
            return episode.fmt.render(thought, Action(type="code", code=code_for(call, j, {})))
        # Images produced by earlier gold calls are named as the steps that made them.
        aligned = [episode.steps[i] for i in matched]
        call = resolve_produced(call, aligned)
        return episode.fmt.render(thought, Action(type="tool_call", tool_call=call))
    recipe = task.metadata.get("answer_from") or {
        "op": "given",
        "value": task.gold.value if task.gold else "",
    }
    answer, shown = answer_from_outputs(recipe, [episode.steps[i] for i in matched])
    final = answer if answer is not None else "unknown"
    return episode.fmt.render(
        thoughts.final(prev, shown, final), Action(type="final_answer", answer=final)
    )


def _tool_options(task: Task, corpus: Path | None) -> dict[str, Any]:
    from tracetune.rollout import task_tool_options

    class _Corpus:  # task_tool_options reads only .corpus
        pass

    holder: Any = _Corpus()
    holder.corpus = corpus
    return task_tool_options(task, holder)


async def run_explore(
    config: ExploreConfig,
    policy: ChatModel | None = None,
    judge: ChatModel | None = None,
    progress: bool = True,
) -> tuple[StageResult, Dataset[Trajectory]]:
    """Explore every task; tasks already explored in ``config.out`` are skipped."""
    if not config.tasks.exists():  # before the output directory is made
        raise InputFileError(f"no task dataset or JSONL file at {config.tasks}")
    out: Dataset[Trajectory] = Dataset.create(config.out, Trajectory)
    tasks, source = load_tasks(config.tasks, out.assets)
    if config.limit:
        tasks = tasks[: config.limit]
    if not tasks:
        raise InputError(f"{config.tasks} holds no tasks")
    if "gold" in config.verifier:
        missing = [t.id for t in tasks if t.gold is None or not t.gold_chain]
        if missing:
            raise InputError(
                f"{len(missing)} task(s) have no gold answer and chain (e.g. {missing[0]}); the "
                "gold verifier needs task programs. Use --verifier llm-best with --judge SPEC"
            )
    names = sorted({n for t in tasks for n in t.tools} | {"final_answer"})
    tools = load_tools(names, config.tool_modules)
    policy_model = MeteredModel(
        policy or load_model(config.policy, config.backend.for_stage(config.concurrency)),
        out.state,
        STAGE,
    )
    judge_model: ChatModel | None = None
    if judge is not None or config.judge:
        judge_model = MeteredModel(
            judge
            or load_model(str(config.judge), config.judge_backend.for_stage(config.concurrency)),
            out.state,
            STAGE,
        )
    greedy = Sampling(temperature=0.0, max_tokens=config.max_tokens, stop=STOP)
    verifier = make_verifier(
        config.verifier,
        policy_model,
        judge_model,
        greedy,
        config.max_steps,
        config.max_errors,
        config.judge_retries,
    )
    explorers: dict[str, Explorer] = {}

    def explorer_for(task: Task) -> Explorer:
        options = _tool_options(task, config.corpus)
        key = repr(sorted(options.items()))
        if key not in explorers:
            agent = Agent(
                policy_model,
                tools,
                config.action_format,
                config.max_steps,
                config.max_errors,
                greedy,
                tool_options=options,
            )
            explorers[key] = Explorer(agent, verifier, config)
        return explorers[key]

    spec = policy_model.spec

    async def process(task: Task) -> Trajectory:
        return await explorer_for(task).explore(
            task, source, out.assets, explore_id(task, config, spec)
        )

    try:
        result = await run_stage(
            STAGE,
            tasks,
            key=lambda task: explore_id(task, config, spec),
            process=process,
            out=out,
            concurrency=config.concurrency,
            budget=config.budget(),
            sources=[source],
            progress=progress,
            total=len(tasks),
        )
    finally:
        await policy_model.aclose()
        if judge_model is not None:
            await judge_model.aclose()
    return result, out
