"""Tools bundled with alignlab that a policy can call in a multi-turn GRPO run (`algorithm.tools`).

A tool is a plain Python function with type hints and a Google-style docstring (an `Args:` section):
transformers' `get_json_schema` turns it into the JSON schema the chat template lists
(alignlab.online.tools). This package imports nothing else of alignlab.
"""

from alignlab.tools.calculator import calculator

__all__ = ["calculator"]
