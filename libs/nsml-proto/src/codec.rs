//! The codec every service's server side decodes requests with: tonic's prost codec, except that a request
//! that is not a valid message is the caller's mistake (INVALID_ARGUMENT naming the message it should have
//! been), not the server's (tonic answers INTERNAL).
//!
//! Clients keep tonic's own codec: an answer they cannot decode is no fault of their request.

use crate::error::ErrorCode;
use std::marker::PhantomData;

use prost::Message;
use tonic::Status;
use tonic::codec::{BufferSettings, Codec, DecodeBuf, Decoder, EncodeBuf, Encoder};
use tonic_prost::{ProstDecoder, ProstEncoder};

/// Encodes answers as tonic's prost codec does and decodes requests, refusing an undecodable one with
/// INVALID_ARGUMENT.
#[derive(Debug, Clone)]
pub struct RequestCodec<T, U> {
    _pd: PhantomData<(T, U)>,
}

impl<T, U> Default for RequestCodec<T, U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<T, U> Codec for RequestCodec<T, U>
where
    T: Message + Send + 'static,
    U: Message + Default + Send + 'static,
{
    type Encode = T;
    type Decode = U;
    type Encoder = ProstEncoder<T>;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        ProstEncoder::default()
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstDecoder::default())
    }
}

/// Decodes a request of type `U`; see [`RequestCodec`].
#[derive(Debug, Clone)]
pub struct RequestDecoder<U>(ProstDecoder<U>);

impl<U: Message + Default> Decoder for RequestDecoder<U> {
    type Item = U;
    type Error = Status;

    fn decode(&mut self, buf: &mut DecodeBuf<'_>) -> Result<Option<U>, Status> {
        self.0.decode(buf).map_err(|s| {
            ErrorCode::BadRequest.status(format!(
                "the request is not a valid {} message: {}",
                proto_name::<U>(),
                s.message()
            ))
        })
    }

    fn buffer_settings(&self) -> BufferSettings {
        self.0.buffer_settings()
    }
}

/// An answer encoded once and sent as it is to every caller it suits: a message's protobuf encoding.
#[derive(Debug, Clone)]
pub struct Encoded(prost::bytes::Bytes);

impl Encoded {
    /// `message`'s encoding.
    pub fn of(message: &impl Message) -> Self {
        Encoded(message.encode_to_vec().into())
    }

    /// The message encoded.
    pub fn decode<M: Message + Default>(&self) -> Result<M, prost::DecodeError> {
        M::decode(self.0.clone())
    }
}

/// As [`RequestCodec`], for a method whose answer is already [`Encoded`]: its bytes are sent as they are.
#[derive(Debug, Clone)]
pub struct EncodedAnswerCodec<U> {
    _pd: PhantomData<U>,
}

impl<U> Default for EncodedAnswerCodec<U> {
    fn default() -> Self {
        Self { _pd: PhantomData }
    }
}

impl<U> Codec for EncodedAnswerCodec<U>
where
    U: Message + Default + Send + 'static,
{
    type Encode = Encoded;
    type Decode = U;
    type Encoder = EncodedEncoder;
    type Decoder = RequestDecoder<U>;

    fn encoder(&mut self) -> Self::Encoder {
        EncodedEncoder
    }

    fn decoder(&mut self) -> Self::Decoder {
        RequestDecoder(ProstDecoder::default())
    }
}

/// Writes an [`Encoded`] answer's bytes.
#[derive(Debug, Clone, Default)]
pub struct EncodedEncoder;

impl Encoder for EncodedEncoder {
    type Item = Encoded;
    type Error = Status;

    fn encode(&mut self, item: Encoded, buf: &mut EncodeBuf<'_>) -> Result<(), Status> {
        use prost::bytes::BufMut;
        buf.put_slice(&item.0);
        Ok(())
    }
}

/// The protobuf name of a generated message type: `nsml_proto::v1::LoginRequest` is `nsml.v1.LoginRequest`.
fn proto_name<U>() -> String {
    let rust = std::any::type_name::<U>();
    let short = rust.rsplit("::").next().unwrap_or(rust);
    format!("nsml.v1.{short}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_named_as_in_the_proto() {
        assert_eq!(
            proto_name::<crate::v1::LoginRequest>(),
            "nsml.v1.LoginRequest"
        );
    }
}
