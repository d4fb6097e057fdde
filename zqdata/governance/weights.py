"""Weights of the annual evaluation of source agencies (Art. 22), kept in the registry (``registry/evaluation.yaml``).

Validated when loaded: exactly the six Art. 20 dimensions, no negative weight, all weights summing to 1.
"""

from __future__ import annotations

import math
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from zqdata.quality.dimensions import DIMENSION_KEYS
from zqdata.registry import RegistryError, registry_dir

FILE_NAME = "evaluation.yaml"
COMPONENTS = (*DIMENSION_KEYS, "delivery", "issue_handling")  # the composite's components, in display order


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Weights(_Strict):
    quality: dict[str, float]
    delivery: float = Field(ge=0)
    issue_handling: float = Field(ge=0)

    @model_validator(mode="after")
    def _complete_and_normalized(self) -> "Weights":
        if sorted(self.quality) != sorted(DIMENSION_KEYS):
            raise ValueError(f"evaluation weights.quality 须恰好列出第二十条六个维度 (must list exactly the six Art. 20 "
                             f"dimensions {', '.join(DIMENSION_KEYS)}), got {', '.join(sorted(self.quality))}")
        negative = sorted(k for k, v in self.quality.items() if v < 0)
        if negative:
            raise ValueError(f"evaluation weights.quality 权重不得为负 (negative weights): {', '.join(negative)}")
        total = sum(self.quality.values()) + self.delivery + self.issue_handling
        if not math.isclose(total, 1.0, abs_tol=1e-9):
            raise ValueError(f"evaluation weights 之和须为 1 (weights must sum to 1), got {total:.6f}")
        return self

    def of(self, component: str) -> float:
        """The weight of a component: a dimension key, ``delivery`` or ``issue_handling``."""
        if component in self.quality:
            return self.quality[component]
        return {"delivery": self.delivery, "issue_handling": self.issue_handling}[component]


class DeliveryScoring(_Strict):
    late_credit: float = Field(ge=0, le=1)


class IssueHandlingTargets(_Strict):
    ack_target_hours: float = Field(gt=0)
    fix_target_hours: float = Field(gt=0)

    @model_validator(mode="after")
    def _ack_before_fix(self) -> "IssueHandlingTargets":
        if self.fix_target_hours < self.ack_target_hours:
            raise ValueError("evaluation issue_handling: 整改时限不得短于确认时限 (fix target shorter than ack target)")
        return self


class EvaluationConfig(_Strict):
    weights: Weights
    delivery: DeliveryScoring
    issue_handling: IssueHandlingTargets


def load_evaluation_config(directory: Path | None = None) -> EvaluationConfig:
    """``registry/evaluation.yaml`` (or ``<directory>/evaluation.yaml``) validated; RegistryError names the problem."""
    d = Path(directory) if directory else registry_dir()
    path = d / FILE_NAME
    try:
        with open(path, encoding="utf-8") as fh:
            doc = yaml.safe_load(fh) or {}
        return EvaluationConfig.model_validate(doc["evaluation"])
    except (OSError, KeyError, TypeError, yaml.YAMLError, ValidationError, ValueError) as exc:
        raise RegistryError(f"评价权重无效 evaluation weights at {path} are invalid: {exc}") from exc
