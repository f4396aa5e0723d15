//! Rows for PostgreSQL's binary `COPY … FROM STDIN (FORMAT binary)`: how a rebuild's fill
//! inserts the new rows of a batch (`Projection::apply_rows`); and [`Tuples`], which reads
//! the rows of a `COPY … TO STDOUT (FORMAT binary)`: how a rebuild reads the feed.
//!
//! A batch's new rows as `INSERT … SELECT * FROM UNNEST($1, $2, …)` make PostgreSQL decode
//! one array per column, build a set of rows from them and insert those; `COPY` in binary
//! form reads each value straight from the message into the row (178,000 contacts: about
//! 1.15 s of a core through `UNNEST`, 0.8 s by `COPY`). Only constant statements are sent:
//! the values travel as binary data, never in SQL text. The column lists are checked by
//! the rebuild tests, which compare every rebuilt table with the live one row by row.

use chrono::{DateTime, Utc};
use sqlx::PgConnection;
use uuid::Uuid;

/// Microseconds from the Unix epoch to PostgreSQL's (2000-01-01 00:00 UTC).
const POSTGRES_EPOCH_MICROS: i64 = 946_684_800_000_000;

/// A value as binary `COPY` carries it: its length, then its bytes (a length of -1 is
/// NULL).
pub(crate) trait Field {
    fn put(&self, out: &mut Vec<u8>);
}

/// Appends `bytes` with their length.
fn sized(out: &mut Vec<u8>, bytes: &[u8]) {
    out.extend_from_slice(&(bytes.len() as i32).to_be_bytes());
    out.extend_from_slice(bytes);
}

impl Field for Uuid {
    fn put(&self, out: &mut Vec<u8>) {
        sized(out, self.as_bytes());
    }
}

impl Field for str {
    fn put(&self, out: &mut Vec<u8>) {
        sized(out, self.as_bytes());
    }
}

impl Field for String {
    fn put(&self, out: &mut Vec<u8>) {
        self.as_str().put(out);
    }
}

impl Field for i64 {
    fn put(&self, out: &mut Vec<u8>) {
        sized(out, &self.to_be_bytes());
    }
}

impl Field for bool {
    fn put(&self, out: &mut Vec<u8>) {
        sized(out, &[u8::from(*self)]);
    }
}

/// `timestamptz`: microseconds since PostgreSQL's epoch.
impl Field for DateTime<Utc> {
    fn put(&self, out: &mut Vec<u8>) {
        (self.timestamp_micros() - POSTGRES_EPOCH_MICROS).put(out);
    }
}

/// `jsonb`: its format version (1), then the JSON text.
impl Field for serde_json::Value {
    fn put(&self, out: &mut Vec<u8>) {
        let at = out.len();
        out.extend_from_slice(&0i32.to_be_bytes());
        out.push(1);
        serde_json::to_writer(&mut *out, self).expect("a JSON value serializes into memory");
        let len = (out.len() - at - 4) as i32;
        out[at..at + 4].copy_from_slice(&len.to_be_bytes());
    }
}

impl<T: Field + ?Sized> Field for &T {
    fn put(&self, out: &mut Vec<u8>) {
        (**self).put(out);
    }
}

impl<T: Field> Field for Option<T> {
    fn put(&self, out: &mut Vec<u8>) {
        match self {
            Some(value) => value.put(out),
            None => out.extend_from_slice(&(-1i32).to_be_bytes()),
        }
    }
}

/// The rows of one `COPY`, in its binary form.
pub(crate) struct Rows {
    data: Vec<u8>,
}

impl Rows {
    pub fn new() -> Self {
        let mut data = Vec::with_capacity(1 << 16);
        // The signature, no flags, no header extension.
        data.extend_from_slice(SIGNATURE);
        data.extend_from_slice(&0i32.to_be_bytes());
        data.extend_from_slice(&0i32.to_be_bytes());
        Self { data }
    }

    /// One row: its fields in the order of the statement's column list.
    pub fn push(&mut self, fields: &[&dyn Field]) {
        self.data
            .extend_from_slice(&(fields.len() as i16).to_be_bytes());
        for field in fields {
            field.put(&mut self.data);
        }
    }

    /// Sends the rows with `statement` (`COPY table (columns) FROM STDIN (FORMAT binary)`)
    /// on `conn`, inside the caller's transaction. Returns the rows copied.
    pub async fn copy(
        mut self,
        conn: &mut PgConnection,
        statement: &str,
    ) -> Result<u64, sqlx::Error> {
        self.data.extend_from_slice(&(-1i16).to_be_bytes());
        let mut copy = conn.copy_in_raw(statement).await?;
        copy.send(self.data).await?;
        copy.finish().await
    }
}

/// The binary `COPY` signature, which starts the data in both directions.
const SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

/// Reads the rows of a binary `COPY … TO STDOUT`, all of whose data is in memory: a
/// constant statement's output, read row by row and field by field in the statement's
/// column order. Any data that is not that form is a protocol error, never a panic.
pub(crate) struct Tuples<'a> {
    data: &'a [u8],
    /// Fields left in the current row.
    fields: i16,
}

impl<'a> Tuples<'a> {
    /// The rows after the header.
    pub fn new(data: &'a [u8]) -> Result<Self, sqlx::Error> {
        let mut tuples = Self { data, fields: 0 };
        if tuples.take(SIGNATURE.len())? != SIGNATURE {
            return Err(malformed("no binary COPY signature"));
        }
        let _flags = tuples.take(4)?;
        let extension = i32::from_be_bytes(tuples.array()?);
        let extension =
            usize::try_from(extension).map_err(|_| malformed("a negative header extension"))?;
        tuples.take(extension)?;
        Ok(tuples)
    }

    /// Starts the next row, which must have `fields` fields; `false` after the last row.
    pub fn next_row(&mut self, fields: i16) -> Result<bool, sqlx::Error> {
        if self.fields != 0 {
            return Err(malformed("a row was not read to its end"));
        }
        match i16::from_be_bytes(self.array()?) {
            -1 if self.data.is_empty() => Ok(false),
            -1 => Err(malformed("data after the trailer")),
            n if n == fields => {
                self.fields = n;
                Ok(true)
            }
            n => Err(malformed(&format!("a row of {n} fields, not {fields}"))),
        }
    }

    /// The next field's bytes (a NULL is an error: the statements read here have none).
    fn field(&mut self) -> Result<&'a [u8], sqlx::Error> {
        if self.fields == 0 {
            return Err(malformed("more fields read than the row has"));
        }
        self.fields -= 1;
        let len = i32::from_be_bytes(self.array()?);
        let len = usize::try_from(len).map_err(|_| malformed("a NULL field"))?;
        self.take(len)
    }

    pub fn text(&mut self) -> Result<String, sqlx::Error> {
        String::from_utf8(self.field()?.to_vec()).map_err(|_| malformed("text that is not UTF-8"))
    }

    pub fn int8(&mut self) -> Result<i64, sqlx::Error> {
        let bytes: [u8; 8] = self
            .field()?
            .try_into()
            .map_err(|_| malformed("an int8 not of 8 bytes"))?;
        Ok(i64::from_be_bytes(bytes))
    }

    pub fn timestamptz(&mut self) -> Result<DateTime<Utc>, sqlx::Error> {
        let micros = self.int8()?;
        micros
            .checked_add(POSTGRES_EPOCH_MICROS)
            .and_then(DateTime::from_timestamp_micros)
            .ok_or_else(|| malformed("a timestamptz out of range"))
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8], sqlx::Error> {
        if self.data.len() < n {
            return Err(malformed("the data ends inside a row"));
        }
        let (taken, rest) = self.data.split_at(n);
        self.data = rest;
        Ok(taken)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], sqlx::Error> {
        Ok(self.take(N)?.try_into().expect("took N bytes"))
    }
}

fn malformed(what: &str) -> sqlx::Error {
    sqlx::Error::Protocol(format!("binary COPY data: {what}"))
}

/// Runs `statement` (`COPY (…) TO STDOUT (FORMAT binary)`) on `conn` and returns all of
/// its data, for [`Tuples`]. Dropped before the end, it leaves `conn` in the middle of the
/// copy: `conn` must then be closed, so it should not be a pool's.
pub(crate) async fn copy_out(
    conn: &mut PgConnection,
    statement: &str,
) -> Result<Vec<u8>, sqlx::Error> {
    use futures::TryStreamExt;
    let mut stream = conn.copy_out_raw(statement).await?;
    let mut data = Vec::with_capacity(1 << 20);
    while let Some(chunk) = stream.try_next().await? {
        data.extend_from_slice(&chunk);
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_row_carries_each_value_with_its_length_and_null_as_minus_one() {
        let mut rows = Rows::new();
        let at = DateTime::<Utc>::from_timestamp(946_684_801, 0).unwrap();
        rows.push(&[&true, &None::<String>, &at, &serde_json::json!({"a": 1})]);
        let data = &rows.data[19..];
        assert_eq!(&data[..2], &4i16.to_be_bytes());
        assert_eq!(&data[2..7], &[0, 0, 0, 1, 1]);
        assert_eq!(&data[7..11], &(-1i32).to_be_bytes());
        assert_eq!(&data[11..15], &8i32.to_be_bytes());
        assert_eq!(&data[15..23], &1_000_000i64.to_be_bytes());
        assert_eq!(&data[23..27], &8i32.to_be_bytes());
        assert_eq!(&data[27..], b"\x01{\"a\":1}");
    }

    fn two_rows() -> Vec<u8> {
        let mut rows = Rows::new();
        let at = DateTime::<Utc>::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        rows.push(&[&7i64, &"contact", &at]);
        rows.push(&[&-1i64, &"é \" \\ ✓", &at]);
        let mut data = rows.data;
        data.extend_from_slice(&(-1i16).to_be_bytes());
        data
    }

    #[test]
    fn rows_written_in_the_binary_form_read_back_field_by_field() {
        let data = two_rows();
        let mut tuples = Tuples::new(&data).unwrap();
        let at = DateTime::<Utc>::from_timestamp_micros(1_764_000_000_123_456).unwrap();
        assert!(tuples.next_row(3).unwrap());
        assert_eq!(tuples.int8().unwrap(), 7);
        assert_eq!(tuples.text().unwrap(), "contact");
        assert_eq!(tuples.timestamptz().unwrap(), at);
        assert!(tuples.next_row(3).unwrap());
        assert_eq!(tuples.int8().unwrap(), -1);
        assert_eq!(tuples.text().unwrap(), "é \" \\ ✓");
        assert_eq!(tuples.timestamptz().unwrap(), at);
        assert!(!tuples.next_row(3).unwrap());
    }

    /// Reads every row of `data` as the rows of `two_rows`.
    fn read_all(data: &[u8]) -> Result<usize, sqlx::Error> {
        let mut tuples = Tuples::new(data)?;
        let mut n = 0;
        while tuples.next_row(3)? {
            tuples.int8()?;
            tuples.text()?;
            tuples.timestamptz()?;
            n += 1;
        }
        Ok(n)
    }

    #[test]
    fn data_cut_short_or_of_another_shape_is_an_error_and_never_a_panic() {
        let data = two_rows();
        assert_eq!(read_all(&data).unwrap(), 2);
        for end in 0..data.len() {
            assert!(read_all(&data[..end]).is_err(), "cut at {end}");
        }
        let mut after_trailer = data.clone();
        after_trailer.push(0);
        assert!(read_all(&after_trailer).is_err());
        let mut signature = data.clone();
        signature[0] = b'X';
        assert!(read_all(&signature).is_err());
        let mut tuples = Tuples::new(&data).unwrap();
        assert!(tuples.next_row(4).is_err(), "a row of another width");
        let mut tuples = Tuples::new(&data).unwrap();
        assert!(tuples.next_row(3).unwrap());
        tuples.int8().unwrap();
        assert!(tuples.int8().is_err(), "a text of 7 bytes read as an int8");
        // A NULL, an invalid UTF-8 text, a row left half read.
        let mut rows = Rows::new();
        rows.push(&[&None::<i64>, &"x", &DateTime::<Utc>::UNIX_EPOCH]);
        let mut null = rows.data;
        null.extend_from_slice(&(-1i16).to_be_bytes());
        assert!(read_all(&null).is_err());
        let mut bad_utf8 = data.clone();
        let at = bad_utf8.windows(7).position(|w| w == b"contact").unwrap();
        bad_utf8[at] = 0xff;
        assert!(read_all(&bad_utf8).is_err());
        let mut tuples = Tuples::new(&data).unwrap();
        assert!(tuples.next_row(3).unwrap());
        tuples.int8().unwrap();
        assert!(tuples.next_row(3).is_err());
    }
}
