//! TensorBoard logs (sd-scripts' `logging_dir`, `log_with = "tensorboard"`, `log_prefix`,
//! `log_tracker_name`): the run's events written as a TensorBoard event file that TensorBoard
//! reads as it reads sd-scripts' own.
//!
//! The folder is sd-scripts': `logging_dir/<log_prefix><YYYYmmddHHMMSS>/<tracker name>/` (the
//! time in UTC; the tracker name defaults to `network_train`), and the scalars carry its tags:
//! `loss/current` and `loss/average` per step, `lr/<group>` per optimizer group (`unet`,
//! `textencoder`, and LoRA+'s `unet_plus` / `textencoder_plus`), `loss/epoch_average` per epoch,
//! `loss/validation/{step,epoch}_{average,divergence}`, plus Loft's `time/it_per_sec` and
//! `time/epoch_seconds`. Epoch values are logged at the epoch number, as sd-scripts does.
//!
//! The file is a TFRecord stream: each record is its length (u64, little-endian), the masked
//! CRC-32C of those 8 bytes, the payload, and the masked CRC-32C of the payload; each payload is
//! a serialized `tensorboard.Event` protobuf (the first holds `file_version = "brain.Event:2"`,
//! the others a `Summary` of one `simple_value`). The few protobuf fields are written by hand.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use super::config::TrainConfig;
use super::events::{EventSink, TrainEvent};

/// CRC-32C (Castagnoli), as TFRecord frames use it.
pub fn crc32c(data: &[u8]) -> u32 {
    const POLY: u32 = 0x82F6_3B78; // reflected 0x1EDC6F41
    let mut crc = !0u32;
    for &byte in data {
        crc ^= byte as u32;
        for _ in 0..8 {
            crc = if crc & 1 == 1 { (crc >> 1) ^ POLY } else { crc >> 1 };
        }
    }
    !crc
}

fn masked_crc(data: &[u8]) -> u32 {
    let crc = crc32c(data);
    ((crc >> 15) | (crc << 17)).wrapping_add(0xA282_EAD8)
}

/// One TFRecord frame around `payload`.
pub fn frame(payload: &[u8]) -> Vec<u8> {
    let len = (payload.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(payload.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc(&len).to_le_bytes());
    out.extend_from_slice(payload);
    out.extend_from_slice(&masked_crc(payload).to_le_bytes());
    out
}

/// The payloads of a TFRecord stream, every CRC checked.
pub fn read_frames(bytes: &[u8]) -> Result<Vec<Vec<u8>>> {
    let mut out = vec![];
    let mut rest = bytes;
    while !rest.is_empty() {
        if rest.len() < 12 {
            bail!("a record header is cut short ({} bytes left)", rest.len());
        }
        let (len_bytes, tail) = rest.split_at(8);
        let header_crc = u32::from_le_bytes(tail[..4].try_into().expect("4 bytes"));
        if header_crc != masked_crc(len_bytes) {
            bail!("a record's length CRC is wrong");
        }
        let len = u64::from_le_bytes(len_bytes.try_into().expect("8 bytes")) as usize;
        let body = &tail[4..];
        if body.len() < len + 4 {
            bail!("a record of {len} bytes is cut short");
        }
        let (payload, tail) = body.split_at(len);
        if u32::from_le_bytes(tail[..4].try_into().expect("4 bytes")) != masked_crc(payload) {
            bail!("a record's payload CRC is wrong");
        }
        out.push(payload.to_vec());
        rest = &tail[4..];
    }
    Ok(out)
}

fn varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn length_delimited(field: u32, bytes: &[u8], out: &mut Vec<u8>) {
    varint(((field << 3) | 2) as u64, out);
    varint(bytes.len() as u64, out);
    out.extend_from_slice(bytes);
}

/// A `tensorboard.Event`: `wall_time` (1, double), `step` (2, int64; both left out at 0, as
/// proto3 does) and one of `file_version` (3) or a `summary` (5) with one `Value` (`tag` = 1,
/// `simple_value` = 2).
pub fn event_payload(wall_time: f64, step: i64, what: &EventBody) -> Vec<u8> {
    let mut out = vec![];
    if wall_time != 0.0 {
        out.push(0x09);
        out.extend_from_slice(&wall_time.to_le_bytes());
    }
    if step != 0 {
        out.push(0x10);
        varint(step as u64, &mut out);
    }
    match what {
        EventBody::FileVersion(v) => length_delimited(3, v.as_bytes(), &mut out),
        EventBody::Scalar(tag, value) => {
            let mut summary_value = vec![];
            length_delimited(1, tag.as_bytes(), &mut summary_value);
            summary_value.push(0x15);
            summary_value.extend_from_slice(&value.to_le_bytes());
            let mut summary = vec![];
            length_delimited(1, &summary_value, &mut summary);
            length_delimited(5, &summary, &mut out);
        }
    }
    out
}

/// What an event holds.
#[derive(Clone, Debug, PartialEq)]
pub enum EventBody {
    FileVersion(String),
    Scalar(String, f32),
}

/// Reads back an event written by [`event_payload`] (or by TensorBoard's writer for scalars):
/// (wall time, step, body). Fields other than those are skipped.
pub fn parse_event(payload: &[u8]) -> Result<(f64, i64, Option<EventBody>)> {
    fn read_varint(b: &[u8], i: &mut usize) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let Some(&byte) = b.get(*i) else { bail!("a varint is cut short") };
            *i += 1;
            v |= ((byte & 0x7f) as u64) << shift;
            if byte & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("a varint is too long")
    }
    /// (field, wire type, value bytes or varint)
    fn fields(b: &[u8]) -> Result<Vec<(u32, &[u8], u64)>> {
        let mut out = vec![];
        let mut i = 0;
        while i < b.len() {
            let key = read_varint(b, &mut i)?;
            let (field, wire) = ((key >> 3) as u32, key & 7);
            match wire {
                0 => {
                    let v = read_varint(b, &mut i)?;
                    out.push((field, &b[0..0], v));
                }
                1 | 5 => {
                    let n = if wire == 1 { 8 } else { 4 };
                    let Some(bytes) = b.get(i..i + n) else { bail!("a fixed field is cut short") };
                    out.push((field, bytes, 0));
                    i += n;
                }
                2 => {
                    let n = read_varint(b, &mut i)? as usize;
                    let Some(bytes) = b.get(i..i + n) else { bail!("a field is cut short") };
                    out.push((field, bytes, 0));
                    i += n;
                }
                other => bail!("wire type {other} is not expected here"),
            }
        }
        Ok(out)
    }
    let (mut wall_time, mut step, mut body) = (0.0, 0, None);
    for (field, bytes, v) in fields(payload)? {
        match field {
            1 => wall_time = f64::from_le_bytes(bytes.try_into().context("wall_time")?),
            2 => step = v as i64,
            3 => body = Some(EventBody::FileVersion(String::from_utf8_lossy(bytes).into_owned())),
            5 => {
                for (f, value, _) in fields(bytes)? {
                    if f != 1 {
                        continue;
                    }
                    let (mut tag, mut simple) = (String::new(), None);
                    for (vf, vb, _) in fields(value)? {
                        match vf {
                            1 => tag = String::from_utf8_lossy(vb).into_owned(),
                            2 => simple = Some(f32::from_le_bytes(vb.try_into().context("simple_value")?)),
                            _ => {}
                        }
                    }
                    if let Some(s) = simple {
                        body = Some(EventBody::Scalar(tag, s));
                    }
                }
            }
            _ => {}
        }
    }
    Ok((wall_time, step, body))
}

/// An open event file.
pub struct EventFile {
    out: BufWriter<File>,
    pub path: PathBuf,
}

impl EventFile {
    /// Creates `events.out.tfevents.<secs>.<host>.<pid>.0` in `dir` with its version record.
    pub fn create(dir: &Path, wall_time: f64) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("logging_dir: cannot create {}", dir.display()))?;
        let host = std::fs::read_to_string("/etc/hostname").ok().map(|h| h.trim().to_string()).filter(|h| !h.is_empty()).unwrap_or_else(|| "loft".into());
        let path = dir.join(format!("events.out.tfevents.{:010}.{host}.{}.0", wall_time as u64, std::process::id()));
        let file = File::create(&path).with_context(|| format!("logging_dir: cannot create {}", path.display()))?;
        let mut f = EventFile { out: BufWriter::new(file), path };
        f.write(wall_time, 0, &EventBody::FileVersion("brain.Event:2".into()))?;
        f.flush()?;
        Ok(f)
    }

    pub fn write(&mut self, wall_time: f64, step: i64, body: &EventBody) -> Result<()> {
        self.out.write_all(&frame(&event_payload(wall_time, step, body))).with_context(|| format!("writing {}", self.path.display()))
    }

    pub fn flush(&mut self) -> Result<()> {
        self.out.flush().with_context(|| format!("writing {}", self.path.display()))
    }
}

/// `YYYYmmddHHMMSS` of a Unix time, in UTC.
fn utc_stamp(unix: u64) -> String {
    let (days, secs) = (unix / 86_400, unix % 86_400);
    // Howard Hinnant's civil-from-days.
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!("{year:04}{month:02}{day:02}{:02}{:02}{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

/// The run's log folder, as sd-scripts names it.
pub fn run_dir(cfg: &TrainConfig, unix: u64) -> PathBuf {
    let tracker = if cfg.log_tracker_name.is_empty() { "network_train" } else { cfg.log_tracker_name.as_str() };
    cfg.logging_dir.join(format!("{}{}", cfg.log_prefix, utc_stamp(unix))).join(tracker)
}

/// A sink that writes the scalars of every event to the event file, then passes the event on.
pub struct TensorBoardSink<'a> {
    inner: &'a mut dyn EventSink,
    file: EventFile,
    epoch_started: f64,
    failed: bool,
}

/// sd-scripts' name of an optimizer group's learning rate.
fn lr_tag(group: &str) -> String {
    format!("lr/{}", group.replace("text_encoder", "textencoder"))
}

impl<'a> TensorBoardSink<'a> {
    /// `None` when `logging_dir` is empty (no logs).
    pub fn open(cfg: &TrainConfig, inner: &'a mut dyn EventSink) -> Result<Option<Self>> {
        if cfg.logging_dir.as_os_str().is_empty() {
            return Ok(None);
        }
        let started = super::unix_now();
        let file = EventFile::create(&run_dir(cfg, started as u64), started)?;
        inner.emit(TrainEvent::Log { level: "info".into(), message: format!("TensorBoard logs: {}", file.path.parent().unwrap_or(&file.path).display()) });
        Ok(Some(TensorBoardSink { inner, file, epoch_started: started, failed: false }))
    }

    fn scalars(&mut self, event: &TrainEvent) -> Result<()> {
        let t = super::unix_now();
        let put = |file: &mut EventFile, step: u64, tag: &str, value: f64| file.write(t, step as i64, &EventBody::Scalar(tag.to_string(), value as f32));
        match event {
            TrainEvent::Started { .. } => self.epoch_started = t,
            TrainEvent::Step { step, loss, avg_loss, lrs, it_per_sec, .. } => {
                put(&mut self.file, *step, "loss/current", *loss)?;
                put(&mut self.file, *step, "loss/average", *avg_loss)?;
                for (group, lr) in lrs {
                    put(&mut self.file, *step, &lr_tag(group), *lr)?;
                }
                put(&mut self.file, *step, "time/it_per_sec", *it_per_sec)?;
            }
            TrainEvent::Epoch { epoch, avg_loss, .. } => {
                put(&mut self.file, *epoch, "loss/epoch_average", *avg_loss)?;
                put(&mut self.file, *epoch, "time/epoch_seconds", t - self.epoch_started)?;
                self.epoch_started = t;
            }
            TrainEvent::Validation { step, epoch, loss, divergence, at_epoch_end } => {
                let (x, kind) = if *at_epoch_end { (*epoch, "epoch") } else { (*step, "step") };
                put(&mut self.file, x, &format!("loss/validation/{kind}_average"), *loss)?;
                put(&mut self.file, x, &format!("loss/validation/{kind}_divergence"), *divergence)?;
            }
            _ => return Ok(()),
        }
        self.file.flush()
    }
}

impl EventSink for TensorBoardSink<'_> {
    fn emit(&mut self, event: TrainEvent) {
        if !self.failed {
            if let Err(e) = self.scalars(&event) {
                // A full disk should not end the run: say so once and stop logging.
                self.failed = true;
                self.inner.emit(TrainEvent::Log { level: "warn".into(), message: format!("TensorBoard logging stopped: {e:#}") });
            }
        }
        self.inner.emit(event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32c_and_framing_are_tfrecords() {
        // The CRC-32C check value, and a payload read back through its frame.
        assert_eq!(crc32c(b"123456789"), 0xE306_9283);
        let framed = frame(b"hello");
        assert_eq!(read_frames(&framed).unwrap(), vec![b"hello".to_vec()]);
        let mut broken = framed.clone();
        broken[13] ^= 1;
        assert!(read_frames(&broken).is_err());
    }

    #[test]
    fn events_read_back() {
        let payload = event_payload(1.5, 300, &EventBody::Scalar("loss/current".into(), 0.25));
        assert_eq!(parse_event(&payload).unwrap(), (1.5, 300, Some(EventBody::Scalar("loss/current".into(), 0.25))));
        let payload = event_payload(2.0, 0, &EventBody::FileVersion("brain.Event:2".into()));
        assert_eq!(parse_event(&payload).unwrap(), (2.0, 0, Some(EventBody::FileVersion("brain.Event:2".into()))));
    }

    #[test]
    fn stamps_are_utc() {
        // date -u -d @1796342400 +%Y%m%d%H%M%S
        assert_eq!(utc_stamp(0), "19700101000000");
        assert_eq!(utc_stamp(1_796_342_400), "20261204000000");
        assert_eq!(utc_stamp(951_827_696), "20000229123456");
    }
}
