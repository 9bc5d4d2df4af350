"""Scripted answers for the M-TRACE chain, served by the real loopback OpenAI server.

``Script(...)`` is a responder for ``ScriptedOpenAIServer``: it reads which prompt a request
carries (query generation, scenario, file code, verifiers, teacher steps, visual QA) and
answers deterministically from the request's content alone, so a resumed run gets the
same answers as an uninterrupted one.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Any

SEEDS = [
    {
        "query": "What is the price of the cheapest item on the receipt in the photo?",
        "tools": ["ocr"],
    },
    {"query": "How many people are in this picture?", "tools": ["face_detection"]},
    {
        "query": "Which month in the attached spreadsheet had the highest sales?",
        "tools": ["inspect_file"],
    },
]

RECEIPT_QUERY = (
    "According to the receipt in the photo and my budget spreadsheet, did I stay "
    "within the grocery budget?"
)
RAIN_QUERY = (
    "Does the rainfall chart agree with the figure for January given in the weather report PDF?"
)
XLSX_CODE = """import openpyxl
wb = openpyxl.Workbook()
ws = wb.active
ws.title = "Budget"
ws.append(["category", "budget"])
ws.append(["groceries", 40])
ws.append(["transport", 25])
wb.save("budget.xlsx")
print("saved")"""
PDF_CODE = """import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.backends.backend_pdf import PdfPages
with PdfPages("weather_report.pdf") as pdf:
    fig = plt.figure(figsize=(8.5, 11))
    fig.text(0.1, 0.9, "Lisbon weather report", fontsize=16)
    fig.text(0.1, 0.85, "January rainfall: 78 mm", fontsize=12)
    pdf.savefig(fig)
    plt.close(fig)
print("saved")"""


def text_of(body: dict[str, Any]) -> str:
    parts = []
    for m in body.get("messages", []):
        c = m.get("content")
        if isinstance(c, str):
            parts.append(c)
        elif isinstance(c, list):
            parts += [p.get("text", "") for p in c if p.get("type") == "text"]
    return "\n".join(parts)


@dataclass
class Script:
    """Which malformed outputs to inject, keyed by what the request is about."""

    queries: list[list[dict[str, Any]] | str] | None = None  # per batch: items or raw text
    broken_scenario_for: tuple[str, ...] = ()  # query substrings whose scenario is not JSON
    raising_code_for: tuple[str, ...] = ()  # file names whose code always raises
    calls: dict[str, int] = field(default_factory=dict)

    def __call__(self, body: dict[str, Any]) -> str:
        text = text_of(body)
        kind, reply = self.route(text, body)
        self.calls[kind] = self.calls.get(kind, 0) + 1
        return reply

    def route(self, text: str, body: dict[str, Any]) -> tuple[str, str]:
        if "You are writing practice tasks" in text:
            return "queries", self.batch(text)
        if "Plan how the task gets solved" in text:
            return "scenario", self.scenario(text)
        if "Write a Python script that creates the file" in text:
            return "code", self.code(text)
        if "You are checking a task written" in text:
            return "verify_task", json.dumps(
                {
                    "thought": "The files hold what the query needs.",
                    "relevant": "yes",
                    "useful": "yes",
                    "obtainable": "yes",
                    "correct": "yes",
                    "updated_query": "",
                }
            )
        if "You are checking a worked example" in text:
            return "verify_trajectory", self.judge_trajectory(text)
        system = body["messages"][0].get("content", "")
        if isinstance(system, str) and ("calls tools" in system or "calling tools" in system):
            return "teacher", self.teacher(body)
        return "visual_qa", "The receipt's total is 36.69 dollars."

    # -- generator ---------------------------------------------------------------------
    def batch(self, text: str) -> str:
        topic = re.search(r'on the topic "([^"]+)"', text)
        index = int(topic.group(1).split()[-1]) if topic else 0
        plan = self.queries or [
            [
                {"query": RECEIPT_QUERY, "tools": ["visual_qa", "inspect_file"]},
                {"query": RAIN_QUERY, "tools": ["inspect_file", "visual_qa"]},
            ]
        ]
        items = plan[index % len(plan)]
        return items if isinstance(items, str) else "```json\n" + json.dumps(items) + "\n```"

    def scenario(self, text: str) -> str:
        query = re.search(r"Task: (.*)", text).group(1)  # type: ignore[union-attr]
        if any(s in query for s in self.broken_scenario_for):
            return '{"information_needed": ["total"], "files": [{"file_type": "image", '
        if "receipt" in query:
            files = [
                {
                    "file_type": "image",
                    "file_name": "receipt.jpg",
                    "file_content": "a printed shop receipt with items, tax and the total",
                },
                {
                    "file_type": "xlsx",
                    "file_name": "budget.xlsx",
                    "file_content": "budget per category: groceries 40, transport 25",
                },
            ]
        elif "rainfall" in query:
            files = [
                {
                    "file_type": "image",
                    "file_name": "chart.png",
                    "file_content": "a bar chart of monthly rainfall in millimetres",
                },
                {
                    "file_type": "pdf",
                    "file_name": "weather_report.pdf",
                    "file_content": "a weather report saying January rainfall was 78 mm",
                },
            ]
        else:
            files = [
                {
                    "file_type": "txt",
                    "file_name": "notes.txt",
                    "file_content": "a short note: " + query[:80],
                }
            ]
        return json.dumps({"information_needed": ["the values in the files"], "files": files})

    def code(self, text: str) -> str:
        name = re.search(r"creates the file `([^`]+)`", text).group(1)  # type: ignore[union-attr]
        if name in self.raising_code_for:
            return "```python\nraise RuntimeError('cannot draw this file')\n```"
        if name.endswith(".xlsx"):
            return "```python\n" + XLSX_CODE.replace("budget.xlsx", name) + "\n```"
        if name.endswith(".pdf"):
            return "```python\n" + PDF_CODE.replace("weather_report.pdf", name) + "\n```"
        return f"```python\nopen({name!r}, 'w').write('note')\n```"

    # -- teacher -----------------------------------------------------------------------
    def teacher(self, body: dict[str, Any]) -> str:
        messages = body["messages"]
        task = text_of({"messages": [messages[1]]})
        files = re.findall(r"([\w.-]+) \(", task.split("Attached files:")[-1])
        image = next((f for f in files if f.endswith((".png", ".jpg", ".jpeg"))), None)
        doc = next((f for f in files if not f.endswith((".png", ".jpg", ".jpeg"))), None)
        steps = sum(1 for m in messages if m["role"] == "assistant")
        json_format = "one call per turn" in str(messages[0].get("content"))
        if json_format:  # one tool call per step: read the document, then answer
            if steps == 0:
                call = {"name": "inspect_file", "arguments": {"path": doc}}
                return f"Thought: I will read {doc}.\nAction: {json.dumps(call)}"
            last = text_of({"messages": [messages[-1]]})
            answer = "40" if "groceries" in last else "78 mm" if "rainfall" in last else "note"
            call = {"name": "final_answer", "arguments": {"answer": answer}}
            return f"Thought: The document says it.\nAction: {json.dumps(call)}"
        if steps == 0:
            code = f"doc = inspect_file(path={doc!r})\nprint(doc)\n"
            if image:
                code += f"seen = visual_qa(image={image!r}, question='What is the total?')\n"
                code += "print(seen)\n"
            return f"Thought: I will read the files.\nCode:\n```py\n{code}```"
        last = text_of({"messages": [messages[-1]]})
        answer = (
            "yes, 36.69 is within the 40 budget"
            if "groceries" in last
            else "yes, 78 mm"
            if "rainfall" in last
            else "it says: note"
        )
        return f"Thought: I have what I need.\nCode:\n```py\nfinal_answer({answer!r})\n```"

    def judge_trajectory(self, text: str) -> str:
        ok = "Error (" not in text
        return json.dumps(
            {
                "thought": "Each step used the right tool and the answer follows.",
                "correct": "yes" if ok else "no",
                "problems": [] if ok else ["tool_misused"],
            }
        )


def config_yaml(
    out: str,
    base_url: str,
    pool: str,
    seeds: str,
    *,
    batches: int = 1,
    per_batch: int = 2,
    embedder: str = "minilm",
    extra: str = "",
) -> str:
    return f"""out: {out}
generator: openai:test-model
judge: openai:test-model
embedder: {embedder}
concurrency: 2
backend:
  base_url: {base_url}
  max_retries: 1
queries:
  seeds: {seeds}
  batches: {batches}
  per_batch: {per_batch}
  few_shot: 3
  topics: [topic 0, topic 1, topic 2, topic 3]
  tools: [ocr, visual_qa, inspect_file, calculator, face_detection]
files:
  pool: {pool}
  image_reuse_cap: 2
rollout:
  teacher: openai:test-model
  action_format: code
  samples: 1
  max_steps: 4
{extra}"""


def write_seeds(path: Any) -> None:
    path.write_text("".join(json.dumps(s) + "\n" for s in SEEDS))
