//! Client-side tools of the `openai` agent, against the mock endpoint speaking the real wire
//! format of streamed tool calls: the calls are assembled from pieces split anywhere, make the
//! interaction wait with `{"tool_calls": [...]}`, and the answer's `tool_outputs` go back to
//! the model as `tool` messages after the assistant's `tool_calls` message.

mod common;

use std::time::Duration;

use common::mock_openai::{DONE_EVENT, MockOpenai, Reply, Step, content_event, role_event};
use common::{TIMEOUT, TestServer, check_log_invariants, types};
use reqwest::StatusCode;
use serde_json::{Value, json};

fn config(base_url: &str) -> String {
    format!(
        r#"
[agents.default]
kind = "echo"

[agents.llm]
kind = "openai"
base_url = "{base_url}"
model = "test-model"
retry_backoff_ms = 10

[[agents.llm.tools]]
name = "get_weather"
description = "The weather in a city"
parameters = {{ type = "object", properties = {{ city = {{ type = "string" }} }} }}

[[agents.llm.tools]]
type = "function"
function = {{ name = "get_time", parameters = {{ type = "object" }} }}
"#
    )
}

/// `data: {chunk}` whose delta holds `tool_calls`.
fn tool_event(calls: Value, finish_reason: Value) -> String {
    let chunk = json!({
        "id": "chatcmpl-test",
        "object": "chat.completion.chunk",
        "created": 1_700_000_000,
        "model": "test-model",
        "choices": [{"index": 0, "delta": {"tool_calls": calls}, "finish_reason": finish_reason}],
    });
    format!("data: {chunk}\n\n")
}

/// A reply that says `text`, then calls each `(id, name, arguments)`, the arguments streamed in
/// pieces of 3 characters; the whole stream is cut into TCP chunks of 7 bytes.
fn tool_reply(text: &str, calls: &[(&str, &str, &str)]) -> Reply {
    let mut stream = role_event();
    if !text.is_empty() {
        stream.push_str(&content_event(text));
    }
    for (index, (id, name, arguments)) in calls.iter().enumerate() {
        stream.push_str(&tool_event(
            json!([{"index": index, "id": id, "type": "function",
                    "function": {"name": name, "arguments": ""}}]),
            Value::Null,
        ));
        let chars: Vec<char> = arguments.chars().collect();
        for piece in chars.chunks(3) {
            let piece: String = piece.iter().collect();
            stream.push_str(&tool_event(
                json!([{"index": index, "function": {"arguments": piece}}]),
                Value::Null,
            ));
        }
    }
    stream.push_str(&tool_event(json!([]), json!("tool_calls")));
    stream.push_str(DONE_EVENT);
    let steps = stream
        .as_bytes()
        .chunks(7)
        .map(|c| Step::Send(c.to_vec()))
        .collect();
    Reply::Stream(steps)
}

async fn until_status(server: &TestServer, id: &str, status: &str) -> Value {
    let deadline = tokio::time::Instant::now() + TIMEOUT;
    loop {
        let answer = server
            .get(&format!("/v1/sessions/t/interactions/{id}"))
            .await;
        if answer.body["status"] == status {
            return answer.body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never {status}: {}",
            answer.body
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn answer_tools(server: &TestServer, waiting: &Value, outputs: Value) -> Value {
    let id = waiting["id"].as_str().expect("id");
    let answer = server
        .post(
            &format!("/v1/sessions/t/interactions/{id}/answer"),
            &json!({"request_id": waiting["request"]["id"], "answer": {"tool_outputs": outputs}}),
        )
        .await;
    assert_eq!(answer.status, StatusCode::OK, "{}", answer.body);
    answer.body
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streamed_tool_calls_wait_for_the_clients_outputs_and_resume() {
    let mock = MockOpenai::start().await;
    mock.push(tool_reply(
        "Let me check. ",
        &[
            ("call_a", "get_weather", r#"{"city": "Paris"}"#),
            ("call_b", "get_time", r#"{"zone": "CET"}"#),
        ],
    ));
    // The model asks for a tool again after the first results.
    mock.push(tool_reply(
        "",
        &[("call_c", "get_weather", r#"{"city": "Rome"}"#)],
    ));
    mock.push(Reply::text(&["Sunny in Paris ", "and Rome, at noon."]));
    let server = TestServer::start(&config(&mock.base_url())).await;
    server.put("/v1/sessions/t", &json!({"agent": "llm"})).await;
    let sent = server.send("t", "weather and time?", "reject").await;
    let id = sent.body["id"].as_str().expect("id").to_string();

    let waiting = until_status(&server, &id, "waiting").await;
    assert_eq!(waiting["response"], "Let me check. ");
    assert_eq!(
        waiting["request"]["data"],
        json!({"tool_calls": [
            {"id": "call_a", "name": "get_weather", "arguments": "{\"city\": \"Paris\"}"},
            {"id": "call_b", "name": "get_time", "arguments": "{\"zone\": \"CET\"}"},
        ]})
    );
    let first = &mock.requests()[0].body;
    assert_eq!(first["tools"][0]["type"], "function");
    assert_eq!(first["tools"][0]["function"]["name"], "get_weather");
    assert_eq!(first["tools"][1]["function"]["name"], "get_time");

    answer_tools(
        &server,
        &waiting,
        json!([
            {"tool_call_id": "call_a", "output": "sunny"},
            {"tool_call_id": "call_b", "output": {"time": "12:00"}},
        ]),
    )
    .await;
    let again = until_status(&server, &id, "waiting").await;
    assert_ne!(again["request"]["id"], waiting["request"]["id"]);
    assert_eq!(again["request"]["data"]["tool_calls"][0]["id"], "call_c");
    let second = &mock.requests()[1].body;
    let messages = second["messages"].as_array().expect("messages");
    let tail: Vec<&Value> = messages.iter().rev().take(3).rev().collect();
    assert_eq!(tail[0]["role"], "assistant");
    assert_eq!(tail[0]["tool_calls"][0]["id"], "call_a");
    assert_eq!(tail[0]["tool_calls"][0]["function"]["name"], "get_weather");
    assert_eq!(
        tail[0]["tool_calls"][1]["function"]["arguments"],
        "{\"zone\": \"CET\"}"
    );
    assert_eq!(
        tail[1],
        &json!({"role": "tool", "tool_call_id": "call_a", "content": "sunny"})
    );
    assert_eq!(
        tail[2],
        &json!({"role": "tool", "tool_call_id": "call_b", "content": "{\"time\":\"12:00\"}"})
    );

    answer_tools(
        &server,
        &again,
        json!([{"tool_call_id": "call_c", "output": "sunny too"}]),
    )
    .await;
    let done = server.wait_final("t", &id).await;
    assert_eq!(done["status"], "completed", "{done}");
    assert_eq!(
        done["response"],
        "Let me check. Sunny in Paris and Rome, at noon."
    );
    assert_eq!(done["answers"].as_array().expect("answers").len(), 2);
    let third = &mock.requests()[2].body;
    let roles: Vec<&str> = third["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().expect("role"))
        .collect();
    assert_eq!(
        roles,
        ["user", "assistant", "tool", "tool", "assistant", "tool"],
        "both exchanges, in order"
    );
    let events = server.stored_events("t");
    check_log_invariants(&events);
    let kinds = types(&events);
    assert_eq!(kinds.iter().filter(|k| *k == "task.waiting").count(), 2);
    assert_eq!(kinds.iter().filter(|k| *k == "task.resumed").count(), 2);

    // The next interaction's history holds the completed one with its tool exchange.
    mock.push(Reply::text(&["ok"]));
    let later = server
        .post(
            "/v1/sessions/t/messages?wait=30",
            &json!({"content": "thanks"}),
        )
        .await;
    assert_eq!(later.body["status"], "completed", "{}", later.body);
    let fourth = &mock.requests()[3].body;
    let roles: Vec<&str> = fourth["messages"]
        .as_array()
        .expect("messages")
        .iter()
        .map(|m| m["role"].as_str().expect("role"))
        .collect();
    assert_eq!(
        roles,
        [
            "user",
            "assistant",
            "tool",
            "tool",
            "assistant",
            "tool",
            "assistant",
            "user"
        ]
    );
    let messages = fourth["messages"].as_array().expect("messages");
    assert_eq!(
        messages[6]["content"],
        "Let me check. Sunny in Paris and Rome, at noon."
    );
    server.stop().await;
}

#[test]
fn tools_without_a_function_name_are_refused() {
    let toml = "[agents.default]\nkind = \"echo\"\n[agents.llm]\nkind = \"openai\"\n\
                base_url = \"http://127.0.0.1:1/v1\"\nmodel = \"m\"\n\
                [[agents.llm.tools]]\ndescription = \"nameless\"\n";
    let error = baton::config::Config::from_toml(toml)
        .expect_err("a tool without a name is refused")
        .to_string();
    assert!(error.contains("function name"), "{error}");
}
