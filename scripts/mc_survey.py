"""Survey BIG-bench multiple-choice tasks: dense smollm2-135m accuracy (deployment scoring) with a
bootstrap 95% CI, against chance; resumable (tasks already in OUT.jsonl are skipped).
A task belongs in the default set (train/tasks.py DEFAULT_TASKS) only when its CI excludes chance.

usage: OMP_NUM_THREADS=1 .venv/bin/python scripts/mc_survey.py N_EXAMPLES OUT.jsonl
(docs/training.md section 5 has the results; the survey so far reached the first five candidates
at N = 150.)"""
import json
import sys

import torch

from tokenskip.errors import UserError
from tokenskip.models import load_model
from tokenskip.routed import RoutedModel
from tokenskip.schedule import Schedule
from tokenskip.train import tasks as T

torch.set_num_threads(1)
N, out = int(sys.argv[1]), sys.argv[2]
CANDIDATES = [
    "general_knowledge", "human_organs_senses", "emoji_movie", "anachronisms", "empirical_judgments",
    "epistemic_reasoning", "figure_of_speech_detection", "english_proverbs", "fantasy_reasoning",
    "date_understanding", "hyperbaton", "navigate", "snarks", "sports_understanding", "physics", "riddle_sense",
    "causal_judgment", "logical_deduction/three_objects", "analogical_similarity", "implicatures",
    "movie_recommendation", "logical_fallacy_detection", "known_unknowns", "odd_one_out", "metaphor_understanding",
    "physical_intuition", "penguins_in_a_table", "ruin_names", "temporal_sequences",
    "tracking_shuffled_objects/three_objects", "intent_recognition", "crass_ai", "cause_and_effect/one_sentence",
    "question_selection", "strategyqa", "social_iqa", "winowhy", "timedial",
    "simple_ethical_questions", "moral_permissibility", "presuppositions_as_nli", "entailed_polarity",
    "evaluating_information_essentiality", "disambiguation_qa", "identify_math_theorems", "bbq_lite_json/age_ambig",
]
lm = load_model("smollm2-135m")
dense = RoutedModel(lm.model, Schedule.dense(lm.model.config.num_hidden_layers), None)
done = set()
try:
    done = {json.loads(x)["task"] for x in open(out)}
except FileNotFoundError:
    pass
for name in CANDIDATES:
    if name in done:
        continue
    try:
        loaded = T.load_tasks([name], N, 0)
    except UserError as exc:
        print(name, "skipped:", exc, flush=True)
        continue
    r = T.run_tasks(dense, lm.tokenizer, loaded, progress=False)[0]
    rec = {"task": name, "accuracy": r.accuracy, "ci": r.accuracy_ci, "chance": r.chance, "n": r.examples,
           "clear": r.accuracy_ci[0] > r.chance}
    print(json.dumps(rec), flush=True)
    with open(out, "a") as f:
        f.write(json.dumps(rec) + "\n")
