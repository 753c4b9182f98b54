"""Data sources for training: prompt files as other projects publish them."""

from .prompt_files import (
    FORMATS,
    GENEVAL_TAGS,
    PromptFileError,
    PromptRecord,
    detect_format,
    load_prompt_file,
)

__all__ = ["FORMATS", "GENEVAL_TAGS", "PromptFileError", "PromptRecord", "detect_format", "load_prompt_file"]
