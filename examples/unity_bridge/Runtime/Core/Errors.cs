using System;

namespace Zyke
{
    /// <summary>A request failed. Code is a ProtocolConstants.ErrorCodes value, or one of the
    /// client-side codes below; RequestId is the request it answers (null when none).</summary>
    public class ZykeException : Exception
    {
        /// <summary>Client-side code: the connection closed or could not be opened.</summary>
        public const string ConnectionLost = "connection_lost";
        /// <summary>Client-side code: the daemon speaks another protocol version.</summary>
        public const string VersionMismatch = "version_mismatch";
        /// <summary>Client-side code: a request's values cannot be sent as JSON (NaN, an object the writer
        /// does not know, a cycle). Nothing was sent; fix the argument.</summary>
        public const string InvalidArgument = "invalid_argument";

        public string Code { get; private set; }
        public string RequestId { get; private set; }

        public ZykeException(string code, string message, string requestId, Exception inner = null)
            : base(message, inner)
        {
            Code = code;
            RequestId = requestId;
        }

        public override string ToString()
        {
            return "ZykeException[" + Code + "] " + Message + (RequestId != null ? " (request " + RequestId + ")" : "");
        }

        /// <summary>The typed exception for an error code.</summary>
        public static ZykeException FromCode(string code, string message, string requestId)
        {
            switch (code)
            {
                case ProtocolConstants.ErrorCodes.Unauthorized:
                case ProtocolConstants.ErrorCodes.NotAuthenticated:
                    return new ZykeAuthException(code, message, requestId);
                case ProtocolConstants.ErrorCodes.Timeout:
                    return new ZykeTimeoutException(message, requestId);
                case ProtocolConstants.ErrorCodes.Cancelled:
                    return new ZykeCancelledException(message, requestId);
                case ProtocolConstants.ErrorCodes.UnsupportedVersion:
                case VersionMismatch:
                    return new ZykeVersionException(code, message, requestId);
                case ConnectionLost:
                    return new ZykeConnectionException(message, requestId);
                case InvalidArgument:
                    return new ZykeArgumentException(message, requestId);
                default:
                    return new ZykeException(code, message, requestId);
            }
        }
    }

    /// <summary>Wrong or missing token (unauthorized, not_authenticated). Reconnecting will not help.</summary>
    public class ZykeAuthException : ZykeException
    {
        public ZykeAuthException(string code, string message, string requestId) : base(code, message, requestId) { }
    }

    /// <summary>The daemon (code timeout) or the client (RequestTimeout) gave up waiting.</summary>
    public class ZykeTimeoutException : ZykeException
    {
        public ZykeTimeoutException(string message, string requestId)
            : base(ProtocolConstants.ErrorCodes.Timeout, message, requestId) { }
    }

    /// <summary>The request was cancelled (CancellationToken or cancel frame).</summary>
    public class ZykeCancelledException : ZykeException
    {
        public ZykeCancelledException(string message, string requestId)
            : base(ProtocolConstants.ErrorCodes.Cancelled, message, requestId) { }
    }

    /// <summary>The connection closed before an answer, or could not be opened.</summary>
    public class ZykeConnectionException : ZykeException
    {
        public ZykeConnectionException(string message, string requestId, Exception inner = null)
            : base(ConnectionLost, message, requestId, inner) { }
    }

    /// <summary>A request's values cannot be written as JSON (e.g. a NaN or a MonoBehaviour in a say's State).
    /// Thrown before anything is sent or connected; the connection is fine.</summary>
    public class ZykeArgumentException : ZykeException
    {
        public ZykeArgumentException(string message, string requestId, Exception inner = null)
            : base(InvalidArgument, message, requestId, inner) { }
    }

    /// <summary>Client and daemon speak different protocol versions.</summary>
    public class ZykeVersionException : ZykeException
    {
        public ZykeVersionException(string code, string message, string requestId) : base(code, message, requestId) { }
    }
}
