"""A chat page for CuteGPT in the browser (gradio): multi-turn, answers streamed as they are
generated, a Stop button, a Clear history button and the generation settings.

    # the published model (base + LoRA, int8 on a GPU); open http://127.0.0.1:7860
    python code/web_demo.py

    # the offline toy model, nothing to download (built and cached the first time, as inference.py --demo)
    python code/web_demo.py --demo

    # your own checkpoint on another port
    python code/web_demo.py --model_path MODEL_DIR --lora_path ckp/llama_lora/llama_lora_epoch3 --port 7861

The model flags are inference.py's (model_loader.add_model_arguments); the conversation goes
through prompt.split_messages and chat.start_reply, as in the API server.  One answer is
generated at a time; other visitors wait in gradio's queue.  Defaults: config.SERVER (host, port)
and config.GENERATION (settings).  Nothing is fetched from the internet: the page uses local fonts
and gradio's analytics are off.
"""
import argparse

import api_server   # its listen flags and port check
import chat
import config
import data_io
import demo_model
import model_loader
import prompt
from data_io import DataError

TITLE = "CuteGPT"


def conversation(history, query, system):
    """(meta_prompt, history pairs, query) from the chatbot's messages and the new query."""
    messages = list(history or [])
    if system.strip() and system.strip() != config.META_PROMPT.strip():
        messages = [{"role": "system", "content": system}] + messages
    return prompt.split_messages(messages + [{"role": "user", "content": query}])


def responder(model, tokenizer, defaults, context_length):
    """The page's answer handler: yields (question box, chat history) updates as the answer grows."""
    import gradio as gr

    def respond(query, history, system, temperature, top_p, top_k, repetition_penalty, max_new_tokens, memory):
        query = (query or "").strip()
        history = list(history or [])
        if not query:
            yield "", history
            return
        try:
            meta_prompt, pairs, query = conversation(history, query, system or "")
            settings = chat.user_settings(defaults, float(temperature), top_p, top_k, repetition_penalty,
                                          max_new_tokens)
            reply = chat.start_reply(model, tokenizer, pairs, query, settings, memory_limit=int(memory),
                                     context_length=context_length, meta_prompt=meta_prompt)
        except (DataError, ValueError) as e:
            raise gr.Error(str(e))
        for message in reply.prepared.notices:
            gr.Warning(message)
        history = history + [{"role": "user", "content": query}, {"role": "assistant", "content": ""}]
        yield "", history   # the question box is emptied once; later updates leave what is typed there
        answer = ""
        try:
            for piece in reply:
                answer += piece
                history[-1] = {"role": "assistant", "content": answer}
                yield gr.skip(), history
            result = reply.result()
            if result.response != answer:
                history[-1] = {"role": "assistant", "content": result.response}
                yield gr.skip(), history
        finally:   # Stop, Clear, a closed page: the generation ends at the next token
            reply.cancel()

    return respond


def build_page(model, tokenizer, defaults, memory_limit=config.MEMORY_LIMIT, notice=None):
    """The gradio Blocks page.  ``defaults``: chat.generation_settings the controls start from."""
    import gradio as gr

    context_length = chat.context_length_of(model, tokenizer)
    initial_temperature = float(defaults["temperature"]) if defaults["do_sample"] else 0.0
    respond = responder(model, tokenizer, defaults, context_length)
    theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                              font_mono=["ui-monospace", "monospace"])
    with gr.Blocks(title=TITLE, analytics_enabled=False) as page:
        gr.Markdown(f"## {TITLE}" + (f"\n{notice}" if notice else ""))
        chatbot = gr.Chatbot(label="Chat", height=420, elem_id="chatbot", feedback_options=None,
                             buttons=["copy", "copy_all"])
        with gr.Row():
            query = gr.Textbox(placeholder="输入问题，回车发送 / type a question, Enter sends", show_label=False,
                               scale=5, elem_id="query", autofocus=True)
            send = gr.Button("Send", variant="primary", scale=1, elem_id="send")
        with gr.Row():
            stop = gr.Button("Stop", elem_id="stop")
            clear = gr.Button("Clear history", elem_id="clear")
        with gr.Accordion("Generation settings", open=False, elem_id="settings"):
            system = gr.Textbox(value=config.META_PROMPT, label="System prompt (replaces the meta prompt)", lines=2)
            with gr.Row():
                temperature = gr.Slider(0.0, 2.0, value=initial_temperature, step=0.05,
                                        label="temperature (0 = greedy)")
                top_p = gr.Slider(0.05, 1.0, value=float(defaults["top_p"]), step=0.05, label="top_p")
                top_k = gr.Slider(0, 200, value=int(defaults["top_k"]), step=1, label="top_k (0 = no limit)")
            with gr.Row():
                penalty = gr.Slider(1.0, 2.0, value=float(defaults["repetition_penalty"]), step=0.05,
                                    label="repetition_penalty (1 = none)")
                max_new = gr.Slider(1, max(1, context_length // 2), value=int(defaults["max_new_tokens"]), step=1,
                                    label="max_new_tokens")
                memory = gr.Slider(0, 10, value=memory_limit, step=1, label="memory_limit (earlier turns fed back)")
        controls = [query, chatbot, system, temperature, top_p, top_k, penalty, max_new, memory]
        events = [trigger(respond, controls, [query, chatbot]) for trigger in (query.submit, send.click)]
        stop.click(None, None, None, cancels=events)
        clear.click(lambda: ([], ""), None, [chatbot, query], cancels=events)
    page.queue(default_concurrency_limit=1)   # one generation at a time; others wait their turn
    return page, theme


def parse_args(argv=None):
    s = config.SERVER
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model_loader.add_model_arguments(p)
    api_server.add_listen_arguments(p, s["web_port"], "",
                                    "earlier turns fed back with each question at the start (the page can "
                                    "change it; default: %(default)s)")
    args = p.parse_args(argv)
    model_loader.check_model_arguments(p, args)
    api_server.check_listen_arguments(p, args)
    return args


def main(argv=None):
    args = parse_args(argv)

    try:
        api_server.check_port_free(args.host, args.port)
        model, tokenizer = model_loader.load_from_args(args)
        notice = None
        if args.demo:
            notice = demo_model.toy_notice(model)
            print(notice, flush=True)
        page, theme = build_page(model, tokenizer, chat.default_settings(args.demo), args.memory_limit, notice)
    except DataError as e:
        data_io.fail(str(e))
    print(f"CuteGPT web demo: http://{args.host}:{args.port} ; Ctrl-C stops", flush=True)
    page.launch(server_name=args.host, server_port=args.port, share=False, inbrowser=False, ssr_mode=False,
                theme=theme, footer_links=[], quiet=False)


if __name__ == "__main__":
    main()
