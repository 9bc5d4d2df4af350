"""Chat backends behind one interface: OpenAI-compatible HTTP and local transformers VLMs."""

from tracetune.models.base import (
    BackendError,
    ChatMessage,
    ChatModel,
    Completion,
    Generation,
    ModelOptions,
    Sampling,
    cache_key,
    data_url,
    image_bytes,
    load_image,
    load_model,
    message_images,
    register_backend,
    text_message,
)

__all__ = [
    "BackendError",
    "ChatMessage",
    "ChatModel",
    "Completion",
    "Generation",
    "ModelOptions",
    "Sampling",
    "cache_key",
    "data_url",
    "image_bytes",
    "load_image",
    "load_model",
    "message_images",
    "register_backend",
    "text_message",
]
