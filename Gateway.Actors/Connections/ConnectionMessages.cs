using System.Net.Sockets;

namespace Gateway.Actors.Connections;

/// <summary>A client connection accepted by the listener, handed to the node's supervisor.</summary>
public sealed record ServeConnection(Socket Socket);

/// <summary>Stop serving: every connection finishes its requests in flight and closes. Answered with <see cref="ConnectionsDrained"/>.</summary>
public sealed record DrainConnections
{
    public static readonly DrainConnections Instance = new();
}

public sealed record ConnectionsDrained(int Closed);

/// <summary>How many connections are open on this node. Answered with an int.</summary>
public sealed record CountConnections
{
    public static readonly CountConnections Instance = new();
}
