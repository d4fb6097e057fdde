"""The six data-quality dimensions of Art. 20 (肇庆市公共数据资源授权运营管理办法), defined once for every tool."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

DimensionKey = Literal["understandability", "accuracy", "standardization", "consistency", "completeness", "timeliness"]
Severity = Literal["error", "warn"]
SEVERITIES: tuple[str, ...] = ("error", "warn")


@dataclass(frozen=True)
class Dimension:
    key: str
    cn_name: str
    en_name: str
    description: str


DIMENSIONS: tuple[Dimension, ...] = (
    Dimension("understandability", "可理解性", "Understandability",
              "数据有登记的含义：字段与登记目录一致、代码值在代码表内，使用者能正确理解。"),
    Dimension("accuracy", "准确性", "Accuracy",
              "数据值真实正确：校验位、取值范围、行政区划等符合国家标准与业务实际。"),
    Dimension("standardization", "规范性", "Standardization",
              "数据格式符合标准与约定：日期、数值、编码的书写格式统一。"),
    Dimension("consistency", "一致性", "Consistency",
              "同一对象在不同数据集之间、同一数据集内部的描述一致，无重复主键。"),
    Dimension("completeness", "完整性", "Completeness",
              "应交付的数据均已交付，必填字段不为空，记录数与清单一致。"),
    Dimension("timeliness", "时效性", "Timeliness",
              "数据按约定时限交付，业务时间落在所属分区日内。"),
)

DIMENSION_KEYS: tuple[str, ...] = tuple(d.key for d in DIMENSIONS)
_BY_KEY = {d.key: d for d in DIMENSIONS}


def dimension(key: str) -> Dimension:
    """The dimension with this English key; a clear error for an unknown key."""
    try:
        return _BY_KEY[key]
    except KeyError:
        raise ValueError(f"未知的数据质量维度 unknown quality dimension {key!r}; 应为 {', '.join(DIMENSION_KEYS)}") from None


def cn_name(key: str) -> str:
    """Chinese name of a dimension key, e.g. 'accuracy' → '准确性'."""
    return dimension(key).cn_name


def label(key: str) -> str:
    """Display label: '准确性 accuracy'."""
    return f"{cn_name(key)} {key}"
