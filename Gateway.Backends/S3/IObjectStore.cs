namespace Gateway.Backends.S3;

/// <summary>
/// The few object-store calls the S3 backend makes. <see cref="S3ObjectStore"/> talks to S3; tests
/// use an in-memory store to make failures, delays and call counts deterministic. Every call may
/// throw on a store failure; the backend turns that into <see cref="BlockErrorKind.Io"/>.
/// </summary>
public interface IObjectStore : IDisposable
{
    /// <summary>
    /// Reads the object's bytes from <paramref name="start"/> into <paramref name="destination"/>; returns how
    /// many it read (fewer when the object is shorter), or -1 only when the store says the key does not
    /// exist (S3's NoSuchKey). Any other "not found" (a missing bucket, a 404 without an S3 error code)
    /// throws: the backend reads -1 as zeros, so it must never stand for data that may still exist.
    /// </summary>
    Task<int> GetAsync(string key, long start, Memory<byte> destination, CancellationToken cancellationToken);

    /// <summary>Stores the first <paramref name="length"/> bytes of <paramref name="data"/> as the whole object.</summary>
    Task PutAsync(string key, byte[] data, int length, CancellationToken cancellationToken);

    /// <summary>Deletes the object; deleting a missing object succeeds.</summary>
    Task DeleteAsync(string key, CancellationToken cancellationToken);

    /// <summary>
    /// The object's length (S3's HEAD); a <see cref="FileNotFoundException"/> when the store says it
    /// does not exist. Stores that never hold whole files (the chunk path's tests) need not answer.
    /// </summary>
    Task<long> GetLengthAsync(string key, CancellationToken cancellationToken) =>
        Task.FromException<long>(new NotSupportedException($"{GetType().Name} does not tell object lengths"));

    /// <summary>The keys that start with <paramref name="prefix"/>.</summary>
    IAsyncEnumerable<string> ListAsync(string prefix, CancellationToken cancellationToken);
}
