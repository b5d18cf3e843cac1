"""The chat formats zerotune knows, by LLaMA-Factory 0.9.5's template names: data only, read by data/templates.py.

Each entry says how a turn is written. `{content}` is the turn's text; `{bos}` and `{eos}` are the tokenizer's
begin/end tokens (after `replace_eos`, the first stop word). Keys and their defaults (LLaMA-Factory's):
  prefix            once, before the first turn ("")
  system            the system turn ("{content}"); with system_in_user it is put in front of the first user turn
  user              a user turn, including the assistant header that follows it ("{content}")
  assistant         a reply: trained, header excluded ("{content}{eos}"; "{content}" with efficient_eos)
  function          a reply that calls tools (the assistant format)
  observation       a tool result (the user format)
  tool_format       how the tool list (system turn) and calls (function turns) are written (data/tool_formats.py)
  tools_wrap        the tool list is the raw JSON in this wrapper instead (phi4_mini)
  default_system    used when a conversation has no system prompt ("")
  stop_words        tokens that end a reply besides eos; each must be one token of the tokenizer
  replace_eos       the first stop word is the template's eos
  efficient_eos     replies carry no eos of their own: the conversation ends with one
  thought_words     a reasoning template: (open, close) of the thought block (enable_thinking applies)
  empty_thought     the block added to a reply that has none (open + close; GLM-4.7: close only)
  tool_call_words   what surrounds a call inside a function turn's text
  system_in_user    the system text is glued to the first user turn (LLaMA-Factory's Llama2Template)
  multimodal_in_lf  LLaMA-Factory ties the template to a vision/audio processor; zerotune uses its text format
The golden test (tests/test_template_goldens.py) checks every entry against LLaMA-Factory's own token ids. Of LF's
text templates only chatglm3 and yuan (single-token slots), bailing_v2 (its "ling" tool format) are not here.
"""

_IM = dict(system="<|im_start|>system\n{content}<|im_end|>\n",
           user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
           assistant="{content}<|im_end|>\n",
           stop_words=("<|im_end|>",))
_QWEN = dict(_IM, observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n"
                              "<|im_start|>assistant\n",
             tool_format="qwen", replace_eos=True)
_THINK = ("<think>\n", "\n</think>\n\n")
_MISTRAL = dict(prefix="{bos}", system="{content}\n\n", user="[INST]{content}[/INST]",
                function="[TOOL_CALLS]{content}{eos}", observation='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]',
                tool_format="mistral", system_in_user=True)
_GEMMA = dict(prefix="{bos}", system="{content}\n\n",
              user="<start_of_turn>user\n{content}<end_of_turn>\n<start_of_turn>model\n",
              assistant="{content}<end_of_turn>\n",
              observation="<start_of_turn>tool\n{content}<end_of_turn>\n<start_of_turn>model\n",
              stop_words=("<end_of_turn>",), replace_eos=True, system_in_user=True)
_GLM = dict(prefix="[gMASK]<sop>", system="<|system|>\n{content}", user="<|user|>\n{content}<|assistant|>",
            assistant="\n{content}", function="{content}", observation="<|observation|>\n{content}<|assistant|>",
            tool_format="glm4", stop_words=("<|user|>", "<|observation|>"), efficient_eos=True)
_GRANITE = dict(system="<|start_of_role|>system<|end_of_role|>{content}<|end_of_text|>\n",
                user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n"
                     "<|start_of_role|>assistant<|end_of_role|>",
                assistant="{content}<|end_of_text|>\n")
_DEEPSEEK3 = dict(prefix="{bos}", user="<｜User｜>{content}<｜Assistant｜>")
_LLAMA3_HEAD = "<|start_header_id|>{role}<|end_header_id|>\n\n"
_LLAMA4_HEAD = "<|header_start|>{role}<|header_end|>\n\n"


def _llama(head: str, eot: str, eom: str) -> dict:
    h = lambda role: head.replace("{role}", role)  # noqa: E731
    return dict(prefix="{bos}", system=h("system") + "{content}" + eot,
                user=h("user") + "{content}" + eot + h("assistant"), assistant="{content}" + eot,
                observation=h("ipython") + "{content}" + eot + h("assistant"), tool_format="llama3",
                stop_words=(eot, eom), replace_eos=True)


TABLE: dict[str, dict] = {
    # Qwen and other ChatML families
    "chatml": dict(_IM, observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
                   stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True),
    "qwen": dict(_QWEN, default_system="You are Qwen, created by Alibaba Cloud. You are a helpful assistant."),
    "qwen3": dict(_QWEN, thought_words=_THINK),
    "qwen3_nothink": dict(_QWEN),
    "qwen3_5": dict(_QWEN, tool_format="qwen3_5", thought_words=_THINK, multimodal_in_lf=True),
    "qwen3_5_nothink": dict(_QWEN, tool_format="qwen3_5", multimodal_in_lf=True),
    "qwen3_6": dict(_QWEN, tool_format="qwen3_5", thought_words=_THINK, multimodal_in_lf=True),
    "mimo": dict(_QWEN, default_system="You are a helpful assistant.", thought_words=_THINK),
    "smollm": dict(_IM),
    "smollm2": dict(_IM, default_system="You are a helpful AI assistant named SmolLM, trained by Hugging Face."),
    "yi": dict(_IM),
    "intern2": dict(_IM, prefix="{bos}", default_system=(
        "You are an AI assistant whose name is InternLM (书生·浦语).\n- InternLM (书生·浦语) is a conversational "
        "language model that is developed by Shanghai AI Laboratory (上海人工智能实验室). It is designed to be helpful, "
        "honest, and harmless.\n- InternLM (书生·浦语) can understand and communicate fluently in the language chosen "
        "by the user such as English and 中文.")),
    "falcon_h1": dict(_IM, prefix="{bos}", observation="<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n",
                      stop_words=("<|im_end|>", "<|end_of_text|>")),
    "lfm2": dict(_IM, observation="<|im_start|>tool\n<|tool_response_start|>{content}<|tool_response_end|><|im_end|>\n"
                                  "<|im_start|>assistant\n",
                 tool_format="lfm2", default_system="You are a helpful AI assistant.",
                 tool_call_words=("<|tool_call_start|>", "<|tool_call_end|>"), replace_eos=True),
    "ernie": dict(system="<|im_start|>system\n{content}<|im_end|>\n\n",
                  user="<|im_start|>user\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
                  assistant="{content}<|im_end|>\n\n",
                  observation="<|im_start|>tool\n{content}<|im_end|>\n\n<|im_start|>assistant\n",
                  default_system="<global_setting>\nthink_mode=True\n</global_setting>", stop_words=("<|im_end|>",)),
    # Llama
    "llama2": dict(system="<<SYS>>\n{content}\n<</SYS>>\n\n", user="{bos}[INST] {content} [/INST]",
                   system_in_user=True),
    "llama3": _llama(_LLAMA3_HEAD, "<|eot_id|>", "<|eom_id|>"),
    "llama4": dict(_llama(_LLAMA4_HEAD, "<|eot|>", "<|eom|>"), multimodal_in_lf=True),
    # Mistral
    "mistral": dict(_MISTRAL, user="[INST] {content}[/INST]", assistant=" {content}{eos}",
                    function="[TOOL_CALLS] {content}{eos}",
                    observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]'),
    "ministral": dict(_MISTRAL),
    "ministral3": dict(_MISTRAL, multimodal_in_lf=True),
    "mistral_small": dict(_MISTRAL, system="[SYSTEM_PROMPT]{content}[/SYSTEM_PROMPT]", system_in_user=False,
                          multimodal_in_lf=True),
    # Gemma
    "gemma": dict(_GEMMA),
    "gemma2": dict(_GEMMA, stop_words=("<eos>", "<end_of_turn>"), replace_eos=False, efficient_eos=True),
    "gemma3": dict(_GEMMA, multimodal_in_lf=True),
    "gemma4": dict(prefix="{bos}", system="<|turn>system\n<|think|>{content}<turn|>\n",
                   user="<|turn>user\n{content}<turn|>\n<|turn>model\n", assistant="{content}<turn|>\n",
                   function="<|tool>{content}<tool|>", observation="<|turn>tool\n{content}<turn|>\n<|turn>model\n",
                   tool_format="gemma4", default_system="You are a helpful assistant.", stop_words=("<turn|>",),
                   thought_words=("<|channel>thought\n", "<channel|>"), replace_eos=True, multimodal_in_lf=True),
    # Phi
    "phi": dict(system="<|system|>\n{content}<|end|>\n", user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
                assistant="{content}<|end|>\n", stop_words=("<|end|>",), replace_eos=True),
    "phi4": dict(system="<|im_start|>system<|im_sep|>{content}<|im_end|>",
                 user="<|im_start|>user<|im_sep|>{content}<|im_end|><|im_start|>assistant<|im_sep|>",
                 assistant="{content}<|im_end|>", stop_words=("<|im_end|>",), replace_eos=True),
    "phi4_mini": dict(system="<|system|>{content}<|end|>", user="<|user|>{content}<|end|><|assistant|>",
                      assistant="{content}<|end|>", tools_wrap="<|tool|>{content}<|/tool|>", stop_words=("<|end|>",),
                      replace_eos=True),
    # DeepSeek
    "deepseek": dict(prefix="{bos}", system="{content}\n\n", user="User: {content}\n\nAssistant:"),
    "deepseek3": dict(_DEEPSEEK3),
    "deepseekr1": dict(_DEEPSEEK3, thought_words=_THINK),
    # GLM
    "glm4": dict(_GLM),
    "glm4_moe": dict(_GLM, tool_format="glm4_moe", thought_words=_THINK),
    "glm4_7": dict(_GLM, tool_format="glm4_moe", thought_words=("<think>", "</think>"), empty_thought="</think>"),
    # others, by family name
    "gpt_oss": dict(system="<|start|>system<|message|>{content}<|end|>",
                    user="<|start|>user<|message|>{content}<|end|><|start|>assistant",
                    default_system="You are ChatGPT, a large language model trained by OpenAI.",
                    thought_words=("<|channel|>analysis<|message|>",
                                   "<|end|><|start|>assistant<|channel|>final<|message|>"),
                    efficient_eos=True),
    "granite3": dict(_GRANITE),
    "granite4": dict(_GRANITE, observation="<|start_of_role|>tool<|end_of_role|>{content}<|end_of_text|>\n"
                                           "<|start_of_role|>assistant\n",
                     default_system="You are Granite, developed by IBM. You are a helpful AI assistant.",
                     stop_words=("<|end_of_text|>",)),
    "cohere": dict(prefix="{bos}", system="<|START_OF_TURN_TOKEN|><|SYSTEM_TOKEN|>{content}<|END_OF_TURN_TOKEN|>",
                   user="<|START_OF_TURN_TOKEN|><|USER_TOKEN|>{content}<|END_OF_TURN_TOKEN|>"
                        "<|START_OF_TURN_TOKEN|><|CHATBOT_TOKEN|>"),
    "olmo": dict(prefix="{eos}", user="<|user|>\n{content}<|assistant|>\n"),
    "exaone": dict(system="[|system|]{content}[|endofturn|]\n", user="[|user|]{content}\n[|assistant|]",
                   assistant="{content}{eos}\n"),
    "hunyuan": dict(prefix="<|startoftext|>", system="{content}<|extra_4|>", user="{content}<|extra_0|>",
                    assistant="{content}<|eos|>", stop_words=("<|eos|>",)),
    "minimax1": dict(system="<beginning_of_sentence>system ai_setting=assistant\n{content}<end_of_sentence>\n",
                     user="<beginning_of_sentence>user name=user\n{content}<end_of_sentence>\n"
                          "<beginning_of_sentence>ai name=assistant\n",
                     assistant="{content}<end_of_sentence>\n",
                     observation="<beginning_of_sentence>tool name=tools\n{content}<end_of_sentence>\n"
                                 "<beginning_of_sentence>ai name=assistant\n",
                     tool_format="minimax1", default_system="You are a helpful assistant.",
                     stop_words=("<end_of_sentence>",)),
    "minimax2": dict(system="]~!b[]~b]system\n{content}[e~[\n", user="]~b]user\n{content}[e~[\n]~b]ai\n",
                     assistant="{content}[e~[\n", observation="]~b]tool\n<response>{content}</response>[e~[\n]~b]ai\n",
                     tool_format="minimax2",
                     default_system="You are a helpful assistant. Your name is MiniMax-M2.1 and is built by MiniMax.",
                     stop_words=("[e~[",), thought_words=_THINK),
    "seed_oss": dict(system="{bos}system\n{content}{eos}", user="{bos}user\n{content}{eos}{bos}assistant\n",
                     function="{bos}\n{content}{eos}", tool_format="seed_oss",
                     thought_words=("<seed:think>", "</seed:think>")),
    # the classics
    "alpaca": dict(user="### Instruction:\n{content}\n\n### Response:\n", assistant="{content}{eos}\n\n",
                   default_system="Below is an instruction that describes a task. Write a response that appropriately "
                                  "completes the request.\n\n"),
    "vicuna": dict(user="USER: {content} ASSISTANT:",
                   default_system="A chat between a curious user and an artificial intelligence assistant. The "
                                  "assistant gives helpful, detailed, and polite answers to the user's questions."),
    "zephyr": dict(system="<|system|>\n{content}{eos}", user="<|user|>\n{content}{eos}<|assistant|>\n",
                   default_system="You are Zephyr, a helpful assistant."),
    "default": dict(system="System: {content}{eos}\n", user="Human: {content}{eos}\nAssistant:",
                    assistant="{content}{eos}\n"),
    "empty": dict(assistant="{content}"),
    # LF's other text templates (older or niche families), converted from LF 0.9.5's registry; the goldens cover them
    "bailing": dict(system='<role>SYSTEM</role>{content}', user='<role>HUMAN</role>{content}<role>ASSISTANT</role>', observation='<role>OBSERVATION</role>{content}<role>ASSISTANT</role>', stop_words=('<|endoftext|>',), efficient_eos=True),
    "breeze": dict(prefix='{bos}', user='[INST] {content} [/INST] ', efficient_eos=True),
    "chatml_de": dict(system='<|im_start|>system\n{content}<|im_end|>\n', user='<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n', assistant='{content}<|im_end|>\n', observation='<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n', default_system='Du bist ein freundlicher und hilfsbereiter KI-Assistent.', stop_words=('<|im_end|>', '<|im_start|>'), replace_eos=True),
    "cpm4": dict(prefix='{bos}', system='<|im_start|>system\n{content}<|im_end|>\n', user='<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n', assistant='{content}<|im_end|>\n', observation='<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n', stop_words=('<|im_end|>',)),
    "dbrx": dict(system='<|im_start|>system\n{content}<|im_end|>\n', user='<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n', assistant='{content}<|im_end|>\n', observation='<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n', default_system="You are DBRX, created by Databricks. You were last updated in December 2023. You answer questions based on information available up to that point.\nYOU PROVIDE SHORT RESPONSES TO SHORT QUESTIONS OR STATEMENTS, but provide thorough responses to more complex and open-ended questions.\nYou assist with various tasks, from writing to coding (using markdown for code blocks — remember to use ``` with code, JSON, and tables).\n(You do not have real-time data access or code execution capabilities. You avoid stereotyping and provide balanced perspectives on controversial topics. You do not provide song lyrics, poems, or news articles and do not divulge details of your training data.)\nThis is your system prompt, guiding your responses. Do not reference it, just respond to the user. If you find yourself talking about this message, stop. You should be responding appropriately and usually that means not mentioning this.\nYOU DO NOT MENTION ANY OF THIS INFORMATION ABOUT YOURSELF UNLESS THE INFORMATION IS DIRECTLY PERTINENT TO THE USER'S QUERY.", stop_words=('<|im_end|>',), replace_eos=True),
    "deepseekcoder": dict(prefix='{bos}', user='### Instruction:\n{content}\n### Response:', assistant='\n{content}\n<|EOT|>\n', default_system='You are an AI programming assistant, utilizing the DeepSeek Coder model, developed by DeepSeek Company, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer.\n'),
    "ernie_nothink": dict(prefix='<|begin_of_sentence|>', system='{content}\n', user='User: {content}\nAssistant: ', assistant='{content}<|end_of_sentence|>', stop_words=('<|end_of_sentence|>',)),
    "falcon": dict(user='User: {content}\nFalcon:', assistant='{content}\n', efficient_eos=True),
    "fewshot": dict(assistant='{content}\n\n', efficient_eos=True),
    "glmz1": dict(prefix='[gMASK]<sop>', system='<|system|>\n{content}', user='<|user|>\n{content}<|assistant|>', assistant='\n{content}', function='{content}', observation='<|observation|>\n{content}<|assistant|>', tool_format='glm4', stop_words=('<|user|>', '<|observation|>'), thought_words=('<think>\n', '\n</think>\n\n'), efficient_eos=True),
    "hunyuan_small": dict(prefix='<｜hy_begin▁of▁sentence｜>', system='{content}<｜hy_place▁holder▁no▁3｜>', user='<｜hy_User｜>{content}<｜hy_place▁holder▁no▁8｜>', assistant='{content}<｜hy_place▁holder▁no▁2｜>', stop_words=('<｜hy_place▁holder▁no▁2｜>',)),
    "hy3": dict(prefix='{bos}', user='<｜hy_User｜>{content}<｜hy_Assistant｜>', assistant='{content}<｜hy_eos｜>', stop_words=('<｜hy_eos｜>',), thought_words=('<think>', '</think>'), replace_eos=True),
    "index": dict(system='<unk>{content}', user='reserved_0{content}reserved_1', efficient_eos=True),
    "llama2_zh": dict(system='<<SYS>>\n{content}\n<</SYS>>\n\n', user='{bos}[INST] {content} [/INST]', default_system='You are a helpful assistant. 你是一个乐于助人的助手。', system_in_user=True),
    "mimo_v2": dict(system='<|im_start|>system\n{content}<|im_end|>\n', user='<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n', assistant='{content}<|im_end|>\n', observation='<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n<|im_start|>assistant\n', tool_format='qwen', default_system='You are MiMo, a helpful AI assistant engineered by Xiaomi.', stop_words=('<|im_end|>',), thought_words=('<think>', '</think>'), replace_eos=True),
    "moonlight": dict(system='<|im_system|>system<|im_middle|>{content}<|im_end|>', user='<|im_user|>user<|im_middle|>{content}<|im_end|><|im_assistant|>assistant<|im_middle|>', assistant='{content}<|im_end|>', default_system='You are a helpful assistant provided by Moonshot-AI.', stop_words=('<|im_end|>',), replace_eos=True),
    "openchat": dict(prefix='{bos}', user='GPT4 Correct User: {content}{eos}GPT4 Correct Assistant:'),
    "openchat-3.6": dict(prefix='{bos}', user='<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|><|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n', stop_words=('<|eot_id|>',)),
    "opencoder": dict(system='<|im_start|>system\n{content}<|im_end|>\n', user='<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n', assistant='{content}<|im_end|>\n', observation='<|im_start|>tool\n{content}<|im_end|>\n<|im_start|>assistant\n', default_system='You are OpenCoder, created by OpenCoder Team.', stop_words=('<|im_end|>',)),
    # LF writes its prefix as {"<|endoftext|>"}, a set that is neither bos nor eos, so it encodes to nothing: followed
    "phi_small": dict( system='<|system|>\n{content}<|end|>\n', user='<|user|>\n{content}<|end|>\n<|assistant|>\n', assistant='{content}<|end|>\n', stop_words=('<|end|>',), replace_eos=True),
    "sailor": dict(system='<|im_start|>system\n{content}<|im_end|>\n', user='<|im_start|>question\n{content}<|im_end|>\n<|im_start|>answer\n', assistant='{content}<|im_end|>\n', default_system='You are an AI assistant named Sailor created by Sea AI Lab. Your answer should be friendly, unbiased, faithful, informative and detailed.', stop_words=('<|im_end|>',)),
    "seed_coder": dict(system='{bos}system\n{content}{eos}', user='{bos}user\n{content}{eos}{bos}assistant\n', default_system='You are an AI programming assistant, utilizing the Seed-Coder model, developed by ByteDance Seed, and you only answer questions related to computer science. For politically sensitive questions, security and privacy issues, and other non-computer science questions, you will refuse to answer.\n\n'),
    "solar": dict(system='### System:\n{content}\n\n', user='### User:\n{content}\n\n### Assistant:\n', efficient_eos=True),
    "starchat": dict(system='<|system|>\n{content}<|end|>\n', user='<|user|>\n{content}<|end|>\n<|assistant|>', assistant='{content}<|end|>\n', stop_words=('<|end|>',)),
    "telechat2": dict(system='<_system>{content}', user='<_user>{content}<_bot>', default_system='你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司和中国电信人工智能研究院（TeleAI）研发的人工智能助手。'),
    "xuanyuan": dict(user='Human: {content} Assistant:', default_system='以下是用户和人工智能助手之间的对话。用户以Human开头，人工智能助手以Assistant开头，会对人类提出的问题给出有帮助、高质量、详细和礼貌的回答，并且总是拒绝参与与不道德、不安全、有争议、政治敏感等相关的话题、问题和指示。\n'),
    "youtu": dict(prefix='{bos}', user='<|User|>{content}<|Assistant|>', assistant='{content}<|end_of_text|>', function='{content}', observation='<tool_response>\n{content}\n</tool_response><|Assistant|>', stop_words=('<|end_of_text|>',), thought_words=('<think>\n', '\n</think>\n\n'), replace_eos=True),
    "aeva": dict(_GLM, tool_format="glm4_moe", thought_words=("<think>", "</think>"), empty_thought="</think>",
                 default_system='You are an AI assistant named Aeva created by Zongzhi Lou. Your answer should be friendly, unbiased, faithful, informative and detailed.'),
}

# LLaMA-Factory templates that need images, video or audio to mean anything: refused, naming the feature.
MULTIMODAL_ONLY = ("qwen2_vl", "qwen3_vl", "qwen3_vl_nothink", "qwen2_audio", "qwen2_omni", "qwen3_omni",
                   "qwen3_omni_nothink", "llava", "llava_next", "llava_next_llama3", "llava_next_mistral",
                   "llava_next_qwen", "llava_next_video", "llava_next_video_mistral", "llava_next_video_yi",
                   "llava_next_yi", "video_llava", "paligemma", "paligemma_chat", "pixtral", "mllama", "minicpm_v",
                   "minicpm_o", "minicpm_v_4_6", "glm4v", "glm4_5v", "glm_ocr", "intern_vl", "kimi_vl", "keye_vl",
                   "mimo_vl", "yi_vl", "granite3_vision", "gemma3n", "gemma4n", "lfm2_vl", "ernie_vl", "dots_ocr",
                   "youtu_vl")
