//! Captions: the `.txt` beside each image, edited one at a time or in bulk. A bulk operation
//! previews by default (the files and their before/after lines, nothing written) and applies
//! with `apply: true`; the last applied operation can be undone. Tags are the comma-separated
//! pieces of a caption, as sd-scripts' shuffle and the taggers see them.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::store::{io_error, write_atomic, DatasetError, Datasets, Result};

/// A bulk caption operation (`POST /api/datasets/{name}/captions`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BulkRequest {
    /// `trigger`, `remove`, `replace`, `dedupe`, `sort` or `undo`.
    pub op: String,
    /// false (the default): a preview that changes nothing.
    #[serde(default)]
    pub apply: bool,
    /// Only this subset (folder name).
    #[serde(default)]
    pub subset: Option<String>,
    /// Only these images, as `SUBSET/FILE`.
    #[serde(default)]
    pub files: Option<Vec<String>>,
    /// `trigger`: the word (or phrase) to add.
    #[serde(default)]
    pub word: Option<String>,
    /// `trigger`: `start` (default) or `end`.
    #[serde(default)]
    pub position: Option<String>,
    /// `remove`: tags to take out (exact, case-insensitive).
    #[serde(default)]
    pub tags: Vec<String>,
    /// `replace`: what to find and what to put instead (`regex`: `find` is a regular expression).
    #[serde(default)]
    pub find: Option<String>,
    #[serde(default)]
    pub with: Option<String>,
    #[serde(default)]
    pub regex: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Change {
    /// `SUBSET/IMAGE`.
    pub file: String,
    pub before: String,
    pub after: String,
}

#[derive(Debug, Serialize)]
pub struct BulkOutcome {
    pub op: String,
    pub applied: bool,
    /// Images looked at.
    pub files: usize,
    /// The ones whose caption changes (or changed).
    pub changes: Vec<Change>,
}

/// Where the last applied bulk operation's "before" lines are kept, inside the dataset (a
/// dot-file: no trainer reads it).
const UNDO_FILE: &str = ".loft-undo.json";

fn split_tags(caption: &str) -> Vec<String> {
    caption.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect()
}

fn join_tags(tags: &[String]) -> String {
    tags.join(", ")
}

/// A caption file's text without its trailing newline (what the operations see).
fn read_caption(path: &std::path::Path) -> String {
    std::fs::read_to_string(path).map(|t| t.trim_end_matches(['\n', '\r']).to_string()).unwrap_or_default()
}

/// The operation as a function of one caption.
fn operation(req: &BulkRequest) -> Result<Box<dyn Fn(&str) -> String>> {
    let invalid = |m: &str| DatasetError::Invalid(m.to_string());
    Ok(match req.op.as_str() {
        "trigger" => {
            let word = req.word.clone().map(|w| w.trim().to_string()).filter(|w| !w.is_empty()).ok_or_else(|| invalid("trigger needs `word`"))?;
            if word.contains(',') {
                return Err(invalid("trigger: `word` is one tag (no comma)"));
            }
            let at_end = match req.position.as_deref().unwrap_or("start") {
                "start" => false,
                "end" => true,
                other => return Err(DatasetError::Invalid(format!("trigger: position {other:?} is not start or end"))),
            };
            Box::new(move |c| {
                let mut tags = split_tags(c);
                if tags.iter().any(|t| t.eq_ignore_ascii_case(&word)) {
                    return c.to_string();
                }
                if at_end {
                    tags.push(word.clone());
                } else {
                    tags.insert(0, word.clone());
                }
                join_tags(&tags)
            })
        }
        "remove" => {
            let gone: Vec<String> = req.tags.iter().map(|t| t.trim().to_lowercase()).filter(|t| !t.is_empty()).collect();
            if gone.is_empty() {
                return Err(invalid("remove needs `tags`"));
            }
            Box::new(move |c| {
                let tags = split_tags(c);
                if !tags.iter().any(|t| gone.contains(&t.to_lowercase())) {
                    return c.to_string();
                }
                join_tags(&tags.into_iter().filter(|t| !gone.contains(&t.to_lowercase())).collect::<Vec<_>>())
            })
        }
        "replace" => {
            let find = req.find.clone().filter(|f| !f.is_empty()).ok_or_else(|| invalid("replace needs `find`"))?;
            let with = req.with.clone().unwrap_or_default();
            if req.regex {
                let re = regex::Regex::new(&find).map_err(|e| DatasetError::Invalid(format!("replace: `find` is not a regular expression: {e}")))?;
                Box::new(move |c| re.replace_all(c, with.as_str()).into_owned())
            } else {
                Box::new(move |c| c.replace(&find, &with))
            }
        }
        "dedupe" => Box::new(|c| {
            let tags = split_tags(c);
            let mut seen: Vec<String> = vec![];
            let kept: Vec<String> = tags.into_iter().filter(|t| {
                let key = t.to_lowercase();
                let new = !seen.contains(&key);
                seen.push(key);
                new
            }).collect();
            if kept.len() == split_tags(c).len() {
                c.to_string()
            } else {
                join_tags(&kept)
            }
        }),
        "sort" => Box::new(|c| {
            let mut tags = split_tags(c);
            let before = tags.clone();
            tags.sort_by_key(|t| t.to_lowercase());
            if tags == before {
                c.to_string()
            } else {
                join_tags(&tags)
            }
        }),
        other => return Err(DatasetError::Invalid(format!("op {other:?} is not one of trigger, remove, replace, dedupe, sort, undo"))),
    })
}

/// The images an operation covers: `(SUBSET/FILE, caption path)`.
fn targets(ds: &Datasets, name: &str, req: &BulkRequest) -> Result<Vec<(String, PathBuf)>> {
    let d = ds.get(name)?;
    if let Some(s) = &req.subset {
        ds.subset_dir(name, s)?;
    }
    let mut out = vec![];
    for subset in &d.subsets {
        if req.subset.as_ref().is_some_and(|s| s != &subset.folder) {
            continue;
        }
        for img in &subset.images {
            let key = format!("{}/{}", subset.folder, img.file);
            if req.files.as_ref().is_some_and(|f| !f.contains(&key)) {
                continue;
            }
            out.push((key, d.path.join(&subset.folder).join(&img.file).with_extension("txt")));
        }
    }
    if let Some(files) = &req.files {
        for f in files {
            let (subset, file) = f.split_once('/').ok_or_else(|| DatasetError::Invalid(format!("files: {f:?} is not SUBSET/FILE")))?;
            ds.image_path(name, subset, file)?;
        }
    }
    Ok(out)
}

/// Runs a bulk operation: a preview, or (with `apply`) the change, recorded for `undo`.
pub fn bulk(ds: &Datasets, name: &str, req: &BulkRequest) -> Result<BulkOutcome> {
    let dir = ds.dataset_dir(name)?;
    if req.op == "undo" {
        return undo(ds, name, &dir, req.apply);
    }
    let op = operation(req)?;
    let targets = targets(ds, name, req)?;
    let mut changes = vec![];
    for (key, caption_path) in &targets {
        let before = read_caption(caption_path);
        let after = op(&before);
        if after != before {
            changes.push(Change { file: key.clone(), before, after });
        }
    }
    if req.apply && !changes.is_empty() {
        let record = serde_json::to_vec_pretty(&changes).expect("serializable");
        write_atomic(&dir.join(UNDO_FILE), &record).map_err(|e| io_error("recording the undo", e))?;
        for c in &changes {
            let (_, path) = targets.iter().find(|(k, _)| k == &c.file).expect("a target");
            write_atomic(path, format!("{}\n", c.after).as_bytes()).map_err(|e| io_error(format!("writing the caption of {}", c.file), e))?;
        }
    }
    Ok(BulkOutcome { op: req.op.clone(), applied: req.apply, files: targets.len(), changes })
}

/// Puts back the captions the last applied operation changed (those still as it left them).
fn undo(ds: &Datasets, name: &str, dir: &std::path::Path, apply: bool) -> Result<BulkOutcome> {
    let record = std::fs::read(dir.join(UNDO_FILE)).map_err(|_| DatasetError::NotFound(format!("dataset {name:?} has no bulk operation to undo")))?;
    let recorded: Vec<Change> = serde_json::from_slice(&record).map_err(|e| DatasetError::Io(format!("the undo record is damaged: {e}")))?;
    // The dataset's images as the operation found them (by listing, as it did).
    let everything = BulkRequest { op: "undo".into(), apply: false, subset: None, files: None, word: None, position: None, tags: vec![], find: None, with: None, regex: false };
    let images = targets(ds, name, &everything)?;
    let mut changes = vec![];
    for c in &recorded {
        let Some((_, path)) = images.iter().find(|(k, _)| *k == c.file) else { continue };
        let now = read_caption(path);
        if now == c.after {
            changes.push((path.clone(), Change { file: c.file.clone(), before: now, after: c.before.clone() }));
        }
    }
    if apply {
        for (path, c) in &changes {
            // No caption before: the file goes again (an empty one would train an empty caption
            // instead of the class tokens, and sd-scripts refuses it).
            let restored = if c.after.is_empty() { std::fs::remove_file(path).or_else(|e| if e.kind() == std::io::ErrorKind::NotFound { Ok(()) } else { Err(e) }) } else { write_atomic(path, format!("{}\n", c.after).as_bytes()) };
            restored.map_err(|e| io_error(format!("restoring the caption of {}", c.file), e))?;
        }
        std::fs::remove_file(dir.join(UNDO_FILE)).map_err(|e| io_error("clearing the undo record", e))?;
    }
    Ok(BulkOutcome { op: "undo".into(), applied: apply, files: recorded.len(), changes: changes.into_iter().map(|(_, c)| c).collect() })
}

/// Saves one image's caption (atomically). An empty text removes the caption file, so the
/// image trains with its subset's class tokens (an empty file would train an empty caption, and
/// sd-scripts refuses one).
pub fn save_caption(ds: &Datasets, name: &str, subset: &str, file: &str, text: &str) -> Result<()> {
    if text.len() > MAX_CAPTION_BYTES {
        return Err(DatasetError::Invalid("caption: longer than 64 KiB".into()));
    }
    let image = ds.image_path(name, subset, file)?;
    let path = image.with_extension("txt");
    let text = text.trim_end_matches(['\n', '\r']).replace("\r\n", "\n");
    if text.trim().is_empty() {
        return match std::fs::remove_file(&path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io_error(format!("removing the caption of {file}"), e)),
            _ => Ok(()),
        };
    }
    write_atomic(&path, format!("{text}\n").as_bytes()).map_err(|e| io_error(format!("writing the caption of {file}"), e))
}

/// The largest caption file Loft writes or imports.
pub const MAX_CAPTION_BYTES: usize = 64 * 1024;

/// How often each tag occurs over a dataset's captions, most frequent first.
pub fn tag_frequency(ds: &Datasets, name: &str) -> Result<Vec<(String, usize)>> {
    let d = ds.get(name)?;
    // Counted case-insensitively, as the filter and the bulk operations match; shown as first seen.
    let mut counts: std::collections::BTreeMap<String, (String, usize)> = Default::default();
    for img in d.subsets.iter().flat_map(|s| &s.images) {
        for tag in split_tags(img.caption.as_deref().unwrap_or("")) {
            counts.entry(tag.to_lowercase()).or_insert_with(|| (tag.clone(), 0)).1 += 1;
        }
    }
    let mut out: Vec<(String, usize)> = counts.into_values().collect();
    out.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(op: &str) -> BulkRequest {
        serde_json::from_value(serde_json::json!({ "op": op })).unwrap()
    }

    #[test]
    fn each_operation_on_one_caption() {
        let run = |r: &BulkRequest, c: &str| operation(r).unwrap()(c);
        let mut t = req("trigger");
        t.word = Some("ohwx".into());
        assert_eq!(run(&t, "1girl, smile"), "ohwx, 1girl, smile");
        assert_eq!(run(&t, "1girl, OHWX"), "1girl, OHWX", "never added twice");
        t.position = Some("end".into());
        assert_eq!(run(&t, "1girl,smile"), "1girl, smile, ohwx");
        assert_eq!(run(&t, ""), "ohwx");
        let mut r = req("remove");
        r.tags = vec!["Smile".into(), "blush".into()];
        assert_eq!(run(&r, "1girl, smile, blush, smiley"), "1girl, smiley");
        assert_eq!(run(&r, "1girl,  looking"), "1girl,  looking", "untouched when nothing matches");
        let mut p = req("replace");
        p.find = Some("girl".into());
        p.with = Some("woman".into());
        assert_eq!(run(&p, "1girl, girl's hat"), "1woman, woman's hat");
        p.regex = true;
        p.find = Some(r"\b(\d)girl\b".into());
        p.with = Some("${1}woman".into());
        assert_eq!(run(&p, "1girl, 2girls"), "1woman, 2girls");
        assert_eq!(run(&req("dedupe"), "a, b, A, c, b"), "a, b, c");
        assert_eq!(run(&req("sort"), "b, C, a"), "a, b, C");
        assert!(operation(&req("shout")).is_err());
        let mut bad = req("replace");
        bad.find = Some("(".into());
        bad.regex = true;
        assert!(operation(&bad).is_err());
    }
}
