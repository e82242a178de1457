//! The chat completions wire format as the agent reads and writes it: the streamed chunks
//! (borrowed from the event's data), tool calls assembled from their pieces, and an
//! interaction's tool exchanges as request messages.

use std::borrow::Cow;

use serde::Deserialize;
use serde_json::{Value, json};

use super::failure::Attempt;
use crate::model::Exchange;

/// One `chat.completion.chunk`, borrowing from the event's data where it can. Only what the
/// agent reads is declared; a value of the wrong type is a protocol error.
#[derive(Deserialize)]
pub(super) struct StreamChunk<'a> {
    #[serde(default, borrow)]
    pub(super) choices: Option<Vec<StreamChoice<'a>>>,
    #[serde(default)]
    pub(super) error: Option<Value>,
}

#[derive(Deserialize)]
pub(super) struct StreamChoice<'a> {
    #[serde(default, borrow)]
    pub(super) delta: Option<StreamDelta<'a>>,
    #[serde(default, borrow)]
    pub(super) finish_reason: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
pub(super) struct StreamDelta<'a> {
    #[serde(default, borrow)]
    pub(super) content: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) tool_calls: Option<Vec<ToolCallDelta<'a>>>,
}

/// A streamed `tool_calls` delta: the first piece of a call names its `index`, `id` and
/// function `name`; later pieces of the same `index` carry more of its `arguments`.
#[derive(Deserialize)]
pub(super) struct ToolCallDelta<'a> {
    #[serde(default)]
    pub(super) index: Option<usize>,
    #[serde(default, borrow)]
    pub(super) id: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) function: Option<FunctionDelta<'a>>,
}

#[derive(Deserialize)]
pub(super) struct FunctionDelta<'a> {
    #[serde(default, borrow)]
    pub(super) name: Option<Cow<'a, str>>,
    #[serde(default, borrow)]
    pub(super) arguments: Option<Cow<'a, str>>,
}

/// Tool calls assembled from their streamed pieces, by index.
#[derive(Default)]
pub(super) struct ToolCalls {
    /// `(id, name, arguments)` in index order.
    pub(super) calls: Vec<(String, String, String)>,
}

/// Calls one reply may make at most (a runaway index is a protocol error, not an allocation).
const MAX_TOOL_CALLS: usize = 128;

impl ToolCalls {
    pub(super) fn add(&mut self, delta: ToolCallDelta<'_>) -> Result<(), String> {
        let index = delta.index.unwrap_or(self.calls.len().saturating_sub(1));
        if index >= MAX_TOOL_CALLS {
            return Err(format!("tool call index {index} is out of range"));
        }
        if index >= self.calls.len() {
            self.calls.resize_with(index + 1, Default::default);
        }
        let call = &mut self.calls[index];
        if let Some(id) = delta.id {
            call.0.push_str(&id);
        }
        if let Some(function) = delta.function {
            if let Some(name) = function.name {
                call.1.push_str(&name);
            }
            if let Some(arguments) = function.arguments {
                call.2.push_str(&arguments);
            }
        }
        Ok(())
    }

    /// The reply's end: the tool calls to ask the client for, if it made any; else the text.
    pub(super) fn end(self, text: String) -> Attempt {
        let calls: Vec<Value> = self
            .calls
            .into_iter()
            .filter(|(id, name, _)| !id.is_empty() || !name.is_empty())
            .map(|(id, name, arguments)| json!({"id": id, "name": name, "arguments": arguments}))
            .collect();
        if calls.is_empty() {
            Attempt::Done(text)
        } else {
            Attempt::ToolCalls(json!({ "tool_calls": calls }))
        }
    }
}

/// The messages of an interaction's tool exchanges: for each request of tool calls, the
/// assistant's `tool_calls` message, then one `tool` message per output of the answer
/// (`{"tool_outputs": [{"tool_call_id", "output"}]}`; an output that is not a string is sent
/// as JSON text; an answer without `tool_outputs` is given as the output of every call).
pub(super) fn push_tool_exchanges(messages: &mut Vec<Value>, answers: &[Exchange]) {
    for exchange in answers {
        let Some(calls) = exchange.request.data["tool_calls"].as_array() else {
            continue;
        };
        let tool_calls: Vec<Value> = calls
            .iter()
            .map(|call| {
                json!({
                    "id": call["id"],
                    "type": "function",
                    "function": {"name": call["name"], "arguments": call["arguments"]},
                })
            })
            .collect();
        messages.push(json!({"role": "assistant", "content": null, "tool_calls": tool_calls}));
        let text = |output: &Value| match output {
            Value::String(text) => text.clone(),
            other => other.to_string(),
        };
        match exchange.answer["tool_outputs"].as_array() {
            Some(outputs) => {
                for output in outputs {
                    messages.push(json!({
                        "role": "tool",
                        "tool_call_id": output["tool_call_id"],
                        "content": text(&output["output"]),
                    }));
                }
            }
            None => {
                for call in calls {
                    messages.push(json!({
                        "role": "tool",
                        "tool_call_id": call["id"],
                        "content": text(&exchange.answer),
                    }));
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_of_the_wrong_shape_are_refused() {
        for bad in [
            r#"{"choices":{}}"#,
            r#"{"choices":[{"delta":{"content":5}}]}"#,
            r#"{"choices":[{"delta":"x"}]}"#,
            "not json",
        ] {
            assert!(
                serde_json::from_str::<StreamChunk<'_>>(bad).is_err(),
                "{bad}"
            );
        }
        for good in [
            r#"{"choices":[]}"#,
            r#"{"choices":null}"#,
            r#"{"choices":[{"delta":{"content":null},"finish_reason":null}]}"#,
            r#"{"choices":[{"index":0,"delta":{"role":"assistant","content":"a\"b"},"logprobs":null}]}"#,
        ] {
            assert!(
                serde_json::from_str::<StreamChunk<'_>>(good).is_ok(),
                "{good}"
            );
        }
    }
}
