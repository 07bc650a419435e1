"""`transformers serve` answers image chat requests on the demo checkpoint: the peer we
compare correctness and speed against."""

from openai import OpenAI

from tests.support import image_data_url


def test_transformers_serve_answers_an_image_chat(transformers_server, tiny_checkpoint, photos):
    client = OpenAI(base_url=transformers_server, api_key="unused")
    reply = client.chat.completions.create(
        model=str(tiny_checkpoint),
        messages=[{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": image_data_url(photos[1])}},
            {"type": "text", "text": "What is in this picture?"}]}],
        max_tokens=6, temperature=0)
    choice = reply.choices[0]
    assert choice.finish_reason == "length"
    assert choice.message.content.strip()
    assert reply.usage.completion_tokens == 6
    # [CLS] + "user :" + 16 image rows + the question + "assistant :"
    assert reply.usage.prompt_tokens == 1 + 2 + 16 + 6 + 2
