"""Answer tool of the team-models example: one JSON answer from the three model stages' outputs."""

from __future__ import annotations


def answer(embeddings: list, scores: list, intent: dict) -> dict:
    """The texts' embeddings, the documents ranked by the cross-encoder's scores, and each text's intent (the
    intent stage's answer: its `label` per text and its logits as `output`)."""
    ranking = sorted(range(len(scores)), key=lambda i: -scores[i])
    return {"embeddings": embeddings, "scores": scores, "ranking": ranking, "intent": intent}
