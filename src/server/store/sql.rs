//! The few queries written once for both backends (results, usage): a
//! parameter, a column read back, and [`SqlRows`], which the history
//! reader implements on SQLite and on PostgreSQL.

use crate::protocol::CaseStatus;

/// A query parameter.
#[derive(Clone, Debug)]
pub enum SqlParam {
    Int(i64),
    Text(Option<String>),
}

/// A column read back (every column these queries read is an integer or
/// a text).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SqlValue {
    Int(Option<i64>),
    Text(Option<String>),
    Bytes(Option<Vec<u8>>),
}

impl SqlValue {
    pub(crate) fn int(&self) -> Option<u64> {
        match self {
            SqlValue::Int(v) => v.and_then(|v| u64::try_from(v).ok()),
            SqlValue::Text(t) => t.as_deref().and_then(|t| t.parse().ok()),
            SqlValue::Bytes(_) => None,
        }
    }
    pub(crate) fn text(&self) -> Option<String> {
        match self {
            SqlValue::Text(t) => t.clone(),
            SqlValue::Int(v) => v.map(|v| v.to_string()),
            SqlValue::Bytes(_) => None,
        }
    }
    /// The bytes, taken out.
    pub(crate) fn take_bytes(&mut self) -> Option<Vec<u8>> {
        match self {
            SqlValue::Bytes(b) => b.take(),
            _ => None,
        }
    }
    /// The text, taken out (rows are read once).
    pub(crate) fn take_text(&mut self) -> Option<String> {
        match self {
            SqlValue::Text(t) => t.take(),
            SqlValue::Int(v) => v.map(|v| v.to_string()),
            SqlValue::Bytes(_) => None,
        }
    }
    pub(crate) fn status(&self) -> CaseStatus {
        self.text()
            .and_then(|s| CaseStatus::from_word(&s))
            .unwrap_or(CaseStatus::Error)
    }
}

/// A database the results queries run on.
#[allow(async_fn_in_trait)] // used generically, never as a trait object
pub trait SqlRows {
    type Error;
    async fn rows(&self, sql: &str, params: &[SqlParam])
        -> Result<Vec<Vec<SqlValue>>, Self::Error>;

    /// One query with each list of parameters, the answers in order (a
    /// network database sends them all before it reads the first answer).
    async fn rows_each(
        &self,
        sql: &str,
        params: &[Vec<SqlParam>],
    ) -> Result<Vec<Vec<Vec<SqlValue>>>, Self::Error> {
        let mut out = Vec::with_capacity(params.len());
        for p in params {
            out.push(self.rows(sql, p).await?);
        }
        Ok(out)
    }
}
