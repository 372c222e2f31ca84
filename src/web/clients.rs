//! What ComfyUI, A1111/Forge and diffusers make of a network, as HTML: a compact row of badges
//! on each saved file and a table on the Network tab (for the current choice, before training).

use askama::Template;
use loft_worker::lora_file::compat::{Level, Verdict};

/// One client's verdict, ready for a template.
pub struct ClientView {
    pub label: &'static str,
    /// CSS class: `exact`, `loads`, `partly` or `no`.
    pub level: &'static str,
    pub level_label: &'static str,
    /// What is lost, one sentence per note.
    pub notes: String,
}

pub fn views(verdicts: &[Verdict]) -> Vec<ClientView> {
    verdicts
        .iter()
        .map(|v| ClientView {
            label: v.client.label(),
            level: match v.level {
                Level::Exact => "exact",
                Level::Loads => "loads",
                Level::Partly => "partly",
                Level::No => "no",
            },
            level_label: v.level.label(),
            notes: v.notes.join("; "),
        })
        .collect()
}

/// The Network tab's box: how each client will load the file this choice trains.
#[derive(Template)]
#[template(path = "_clients_box.html")]
pub struct ClientsBox {
    pub clients: Vec<ClientView>,
    /// Some client falls short.
    pub warn: bool,
    /// Converting the trained file to a plain LoRA would fix it.
    pub convert: bool,
}

impl ClientsBox {
    pub fn new(verdicts: &[Verdict], convert: bool) -> Self {
        ClientsBox { warn: verdicts.iter().any(|v| v.level < Level::Loads), clients: views(verdicts), convert }
    }
}
