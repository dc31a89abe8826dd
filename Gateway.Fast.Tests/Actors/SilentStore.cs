using System.Net;
using System.Net.Sockets;

namespace Gateway.Tests.Actors;

/// <summary>A loopback endpoint that accepts connections and never answers; once closed it refuses them.</summary>
internal sealed class SilentStore : IDisposable
{
    private readonly TcpListener _listener = new(IPAddress.Loopback, 0);
    private readonly List<Socket> _held = [];
    private readonly TaskCompletionSource _connected = new(TaskCreationOptions.RunContinuationsAsynchronously);
    private readonly Task _accepting;

    public SilentStore()
    {
        _listener.Start();
        Endpoint = $"http://127.0.0.1:{((IPEndPoint)_listener.LocalEndpoint).Port}";
        _accepting = AcceptAsync();
    }

    public string Endpoint { get; }

    public Task Connected => _connected.Task;

    private async Task AcceptAsync()
    {
        try
        {
            while (true)
            {
                Socket socket = await _listener.AcceptSocketAsync().ConfigureAwait(false);
                lock (_held)
                {
                    _held.Add(socket);
                }
                _connected.TrySetResult();
            }
        }
        catch (Exception e) when (e is SocketException or ObjectDisposedException)
        {
            // Closed.
        }
    }

    public void Close()
    {
        _listener.Stop();
        lock (_held)
        {
            foreach (Socket socket in _held)
            {
                socket.Dispose();
            }
            _held.Clear();
        }
    }

    public void Dispose()
    {
        Close();
        _accepting.Wait(TimeSpan.FromSeconds(5));
    }
}
