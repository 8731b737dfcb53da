"""The ChatML prompt of a question answered from numbered passages, shared by the chat
decoder's zero-shot answers (retrieval/chat_generator.py), its RAFT fine-tuning examples
(train/tasks/prefix_lm_examples.py, `data.prompt_format="chat"`) and k-shot prompting
(train/experiments/in_context.py): a model fine-tuned on these prompts is asked the same
way at test time.

    <|im_start|>system     Answer briefly, in a few words, from the numbered passages ...
    <|im_start|>user       [1] passage one\\n[2] passage two\\n\\nQuestion: ...
    <|im_start|>assistant  (the answer, then <|im_end|>)

Closed-book (no passages): the system message asks for a brief answer and the user turn
holds the question alone. Demonstrations (k-shot) are earlier user/assistant exchanges
in the same format, before the question.
"""

SYSTEM_WITH_PASSAGES = (
    "Answer the question briefly, in a few words, using the numbered passages. "
    "Reply with the answer only.")
SYSTEM_CLOSED_BOOK = "Answer the question briefly, in a few words. Reply with the answer only."


def user_turn(question: str, passages) -> str:
    """The user's message: the numbered passages (best first), then the question."""
    if not passages:
        return question
    numbered = "\n".join(f"[{i}] {text}" for i, text in enumerate(passages, start=1))
    return f"{numbered}\n\nQuestion: {question}"


def chat_messages(question: str, passages, demonstrations=()) -> list[dict]:
    """A question and its passages (none: closed-book) -> ChatML messages.

    demonstrations: (question, passages, answer) exchanges shown before the question
    (k-shot prompting); the system message follows the question's own passages."""
    system = SYSTEM_WITH_PASSAGES if passages else SYSTEM_CLOSED_BOOK
    messages = [{"role": "system", "content": system}]
    for demo_question, demo_passages, demo_answer in demonstrations:
        messages += [{"role": "user", "content": user_turn(demo_question, demo_passages)},
                     {"role": "assistant", "content": demo_answer}]
    return messages + [{"role": "user", "content": user_turn(question, passages)}]


def prompt_ids(tokenizer, question: str, passages, demonstrations=()) -> list[int]:
    """The rendered ChatML prompt's token ids, ending with the assistant's turn opener."""
    return list(tokenizer.encode(tokenizer.apply_chat_template(
        chat_messages(question, passages, demonstrations))))
