"""The shapes world: coloured circles, squares and triangles, GenEval-style prompts, an exact verifier.

    from margrpo.worlds import shapes
    img = shapes.render_scene("a red circle left of a blue square", np.random.default_rng(0))
    shapes.score([img], ["a red circle left of a blue square"])  # [{'strict': True, 'partial': 1.0, ...}]

Modules: `spec` (palette, vocabulary, metadata types), `prompts` (grammar, parser, held-out split),
`render` (scenes and tensors), `detection` (pixels to objects), `verifier` (scores and summaries).
"""

from .detection import Detection, detect, detect_batch
from .prompts import (
    DEMO_PROMPTS,
    HELDOUT_KINDS,
    HELDOUT_PAIRS,
    HELDOUT_RELATIONS,
    all_prompts,
    format_prompt,
    heldout_prompts,
    is_heldout,
    parse_prompt,
    sample_train_prompt,
    train_prompts,
)
from .render import (
    LayoutConfig,
    PlacementError,
    SceneObject,
    draw_scene,
    images_to_tensor,
    layout_scene,
    render_batch,
    render_scene,
    tensor_to_images,
)
from .spec import (
    BACKGROUND,
    CATEGORIES,
    COLOURS,
    COUNT_WORDS,
    PALETTE,
    RELATIONS,
    SHAPES,
    ObjectSpec,
    PromptSpec,
    RelationSpec,
)
from .verifier import evaluate, score, score_arrays, score_tensors, summarize

__all__ = [
    "BACKGROUND",
    "CATEGORIES",
    "COLOURS",
    "COUNT_WORDS",
    "DEMO_PROMPTS",
    "HELDOUT_KINDS",
    "HELDOUT_PAIRS",
    "HELDOUT_RELATIONS",
    "PALETTE",
    "RELATIONS",
    "SHAPES",
    "Detection",
    "LayoutConfig",
    "ObjectSpec",
    "PlacementError",
    "PromptSpec",
    "RelationSpec",
    "SceneObject",
    "all_prompts",
    "detect",
    "detect_batch",
    "draw_scene",
    "evaluate",
    "format_prompt",
    "heldout_prompts",
    "images_to_tensor",
    "is_heldout",
    "layout_scene",
    "parse_prompt",
    "render_batch",
    "render_scene",
    "sample_train_prompt",
    "score",
    "score_arrays",
    "score_tensors",
    "summarize",
    "tensor_to_images",
    "train_prompts",
]
